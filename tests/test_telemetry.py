"""QuantTelemetry: hand-computed statistics, real CSV / offline W&B loggers, charts, DDP, MNIST end to end."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from fixtures import MLPClassifier, quiet_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader
from wandb_run_file import finished_run_records, history_rows

from lightning_ste import (
    BlendedQuantWeights,
    QuantizeActivations,
    QuantReLU,
    QuantTelemetry,
    WeightQuantizer,
    quantize_weights_,
)
from lightning_ste.callbacks.telemetry import CHART_FILENAME
from lightning_ste.occupancy import _replicated_histogram, level_counts
from lightning_ste.recipes.data.mnist import MNISTDataModule

# One training batch, seen at every step: alpha = 0.5, bits = 2 (L = 3, L*alpha = 1.5), ceil rounding.
X = torch.tensor([[-1.0, 0.0, 0.2, 0.6, 1.4, 1.6, 2.0, 3.0]]).repeat(2, 1)
# ceil(x / 0.5) clamped to 0..3: 0, 0, 1, 2, 3, 3, 3, 3 -> level shares 2/8, 1/8, 1/8, 4/8.
LEVEL_SHARES = [0.25, 0.125, 0.125, 0.5]
CLIPPED_SHARE = 3 / 8  # 1.6, 2.0, 3.0 > 1.5
FLIPPED = 3  # latent weights negated by hand before the third step


class Toy(pl.LightningModule):
    """QuantReLU with a fixed alpha feeding a 1-bit Linear; SGD with lr 0, so only the hand flips move W."""

    def __init__(self, quantize_weight: bool = True) -> None:
        super().__init__()
        self.act = QuantReLU(bits=2, alpha=0.5, alpha_mode="fixed")
        self.lin = nn.Linear(8, 4, bias=False)
        if quantize_weight:
            parametrize.register_parametrization(self.lin, "weight", WeightQuantizer(bits=1))

    def forward(self, x):
        return self.lin(self.act(x))

    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            with torch.no_grad():
                self.lin.parametrizations.weight.original[0, :FLIPPED].neg_()
        loss = self(batch).square().mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        # Far above L*alpha: would change every share if validation were counted.
        self(batch * 100)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _loader(n: int = 4) -> DataLoader:
    return DataLoader([X] * n, batch_size=None)


def _trainer(tmp_path: Path, callbacks, logger, **kwargs) -> pl.Trainer:
    defaults = dict(max_epochs=1, logger=logger, default_root_dir=tmp_path, callbacks=callbacks)
    return quiet_trainer(**{**defaults, **kwargs})


def _rows(logger: CSVLogger, key: str) -> list[dict[str, str]]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get(key)]


def _expected_error(w: torch.Tensor) -> float:
    q = w.abs().mean() * torch.sign(w)
    return float((q - w).norm() / w.norm())


def test_level_counts_by_hand():
    counts, clipped = level_counts(X, torch.tensor(0.5), bits=2)
    assert counts.tolist() == [4, 2, 2, 8]
    assert int(clipped) == 6
    # Nearest rounding: round(x / 0.5) = -2, 0, 0, 1, 3, 3, 4, 6 -> clamped 0, 0, 0, 1, 3, 3, 3, 3.
    counts, _ = level_counts(X, torch.tensor(0.5), bits=2, rounding="nearest")
    assert counts.tolist() == [6, 2, 0, 8]
    # bf16 input is quantized in float32, as the forward does; NaN counts on no level, +inf on the top.
    x = torch.tensor([float("nan"), float("inf"), 0.3, -float("inf"), 0.51]).bfloat16()
    counts, clipped = level_counts(x, torch.tensor(0.5), 2)
    assert counts.tolist() == [1, 1, 1, 1] and int(clipped) == 1
    # A channels_last input of a big tensor (the replicated counters on an accelerator take this path too).
    x = torch.randn(4, 8, 16, 16).to(memory_format=torch.channels_last)
    counts, clipped = level_counts(x, torch.tensor(0.3), 3)
    k = torch.div(x, 0.3).ceil().clamp(0, 7).long().flatten()
    assert counts.tolist() == torch.bincount(k, minlength=8).tolist()
    assert int(clipped) == int((x > 2.1).sum())


@pytest.mark.parametrize("n, bins", [(1, 4), (1000, 16), (65536 * 2 + 17, 16), (5000, 256)])
def test_replicated_histogram_of_the_accelerator_path(n, bins):
    index = torch.randint(0, bins, (n,), dtype=torch.int32)
    expected = torch.bincount(index, minlength=bins)
    assert torch.equal(_replicated_histogram(index.clone(), bins), expected)


def test_known_alpha_clipping_occupancy_and_flips(tmp_path):
    model = Toy()
    logger = CSVLogger(tmp_path, name="csv")
    telemetry = QuantTelemetry(log_every_n_steps=2)
    trainer = _trainer(
        tmp_path, [telemetry], logger, limit_val_batches=1, val_check_interval=1, log_every_n_steps=1
    )
    trainer.fit(model, _loader(), _loader(1))

    rows = _rows(logger, "quant/act/alpha")
    assert len(rows) == 2, "logged at global steps 2 and 4 only"
    assert [int(r["step"]) for r in rows] == [1, 3]  # Lightning's own step index for those batches
    numel = model.lin.parametrizations.weight.original.numel()
    error = _expected_error(model.lin.parametrizations.weight.original.detach())
    for row, flips in zip(rows, [0, FLIPPED]):
        assert float(row["quant/act/alpha"]) == pytest.approx(0.5)
        assert float(row["quant/act/clipped"]) == pytest.approx(CLIPPED_SHARE)
        assert float(row["quant/act/zero"]) == pytest.approx(LEVEL_SHARES[0])
        assert [float(row[f"quant/act/level_{k}"]) for k in range(4)] == pytest.approx(LEVEL_SHARES)
        assert float(row["quant/lin/flip_ratio"]) == pytest.approx(flips / numel)
        # Negating weights keeps mean|W|, so the error is the same before and after the flips.
        assert float(row["quant/lin/quant_error"]) == pytest.approx(error, rel=1e-5)
        assert "quant/lin/rho" not in row or row["quant/lin/rho"] == ""
    assert telemetry.last_occupancy["act"] == pytest.approx(LEVEL_SHARES)
    # Hooks are gone after fit.
    assert not model.act._forward_hooks
    chart = Path(logger.log_dir) / CHART_FILENAME
    assert telemetry.chart_path == str(chart)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rho_from_blended_quant_weights_and_gradient_accumulation(tmp_path):
    model = Toy(quantize_weight=False)
    logger = CSVLogger(tmp_path, name="csv")
    blend = BlendedQuantWeights(bits=1, rho=0.125)
    telemetry = QuantTelemetry(log_every_n_steps=1, log_levels=False, occupancy_chart=False)
    # 8 batches, 2 per optimizer step: 4 logs, each window holding 2 batches.
    trainer = _trainer(tmp_path, [blend, telemetry], logger, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(model, _loader(8))
    rows = _rows(logger, "quant/act/alpha")
    assert len(rows) == 4
    for row in rows:
        assert float(row["quant/lin/rho"]) == pytest.approx(0.125)
        assert float(row["quant/act/clipped"]) == pytest.approx(CLIPPED_SHARE)
        assert "quant/act/level_0" not in row
    # The blend W <- (1 - rho) W + rho q(W) never changes a sign; only the hand flips (batch 2, step 2) do.
    numel = model.lin.parametrizations.weight.original.numel()
    assert [float(r["quant/lin/flip_ratio"]) for r in rows] == pytest.approx([0, FLIPPED / numel, 0, 0])
    final_error = _expected_error(model.lin.parametrizations.weight.original.detach())
    assert float(rows[-1]["quant/lin/quant_error"]) == pytest.approx(final_error, rel=1e-5)
    assert not (Path(logger.log_dir) / CHART_FILENAME).exists()


class ToyTransposed(pl.LightningModule):
    """A 2-bit per-channel ConvTranspose (weight laid out ``[in, out/groups, *k]``) and lr 0."""

    def __init__(self) -> None:
        super().__init__()
        self.deconv = nn.ConvTranspose1d(4, 6, kernel_size=3, groups=2, bias=False)
        quantize_weights_(self, bits=2, per_channel=True)

    def training_step(self, batch, batch_idx):
        return self.deconv(batch.view(2, 4, 2)).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_quant_error_of_a_transposed_conv_is_against_the_q_w_the_layer_uses(tmp_path):
    # Per output channel, as the layer's own q(W): not per input channel, as the [in, out/g, k] layout reads.
    model = ToyTransposed()
    logger = CSVLogger(tmp_path, name="csv")
    telemetry = QuantTelemetry(log_every_n_steps=1, occupancy_chart=False)
    _trainer(tmp_path, [telemetry], logger, max_steps=1, limit_val_batches=0).fit(model, _loader(1))
    w = model.deconv.parametrizations.weight.original.detach()
    expected = float((model.deconv.weight.detach() - w).norm() / w.norm())
    assert telemetry.last_metrics["quant/deconv/quant_error"] == pytest.approx(expected, rel=1e-5)


def test_collect_every_n_steps_samples_the_window(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    telemetry = QuantTelemetry(log_every_n_steps=4, collect_every_n_steps=2, occupancy_chart=False)
    trainer = _trainer(tmp_path, [telemetry], logger, limit_val_batches=0)
    # Steps 0 and 2 see X; steps 1 and 3 a batch on level 1 only, which sampling every 2nd step skips.
    trainer.fit(Toy(), DataLoader([X, torch.full((2, 8), 0.1)] * 2, batch_size=None))
    (row,) = _rows(logger, "quant/act/alpha")
    assert [float(row[f"quant/act/level_{k}"]) for k in range(4)] == pytest.approx(LEVEL_SHARES)


def test_disabled_logs_nothing_and_registers_no_hook(tmp_path):
    model = Toy()
    logger = CSVLogger(tmp_path, name="csv")
    telemetry = QuantTelemetry(log_every_n_steps=1, enabled=False)

    class HookCheck(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            assert not pl_module.act._forward_hooks

    trainer = _trainer(tmp_path, [telemetry, HookCheck()], logger, limit_val_batches=0, log_every_n_steps=1)
    trainer.fit(model, _loader())
    assert not _rows(logger, "quant/act/alpha")
    assert telemetry.last_metrics == {}
    assert not (Path(logger.log_dir) / CHART_FILENAME).exists()


def test_offline_wandb_run_files_hold_the_quant_keys(tmp_path):
    wandb = pytest.importorskip("wandb")
    model = Toy()
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="lightning-ste-tests")
    trainer = _trainer(tmp_path, [QuantTelemetry(log_every_n_steps=2)], logger, limit_val_batches=0)
    trainer.fit(model, _loader())
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    (run_file,) = run_dir.glob("*.wandb")
    history = history_rows(finished_run_records(run_file))
    stats = [row for row in history if "quant/act/alpha" in row]
    assert [row["trainer/global_step"] for row in stats] == [1, 3]
    for row, flips in zip(stats, [0, FLIPPED]):
        assert row["quant/act/alpha"] == pytest.approx(0.5)
        assert row["quant/act/clipped"] == pytest.approx(CLIPPED_SHARE)
        assert [row[f"quant/act/level_{k}"] for k in range(4)] == pytest.approx(LEVEL_SHARES)
        assert row["quant/lin/flip_ratio"] == pytest.approx(flips / 32)
        assert "quant/lin/quant_error" in row
        assert row["quant/alpha_histogram/_type"] == "histogram"
        assert sum(row["quant/alpha_histogram/values"]) == 1  # one quantizer
    (chart,) = [row for row in history if "quant/level_occupancy/_type" in row]
    assert chart["quant/level_occupancy/_type"] == "image-file"
    assert chart["quant/level_occupancy_table/_type"] == "table-file"
    assert (run_dir / "files" / chart["quant/level_occupancy/path"]).exists()
    # Without a CSV/TensorBoard logger the trainer's log dir is the W&B save_dir: the PNG lands there.
    assert (tmp_path / CHART_FILENAME).exists()


class _RankData(Toy):
    """Rank r trains on batch r of ``DATA`` (DistributedSampler, no shuffle)."""

    def __init__(self) -> None:
        super().__init__(quantize_weight=False)  # ddp_spawn pickles the module: parametrized ones refuse

    def train_dataloader(self):
        return DataLoader(DATA, batch_size=None, shuffle=False)


DATA = [X, torch.full((2, 8), 0.1)]  # the second batch: every element on level 1


def test_ddp_windows_are_summed_over_processes(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version=0)  # the spawned rank 0 writes, the parent reads
    trainer = _trainer(
        tmp_path,
        [QuantTelemetry(log_every_n_steps=1, occupancy_chart=False)],
        logger,
        strategy="ddp_spawn",
        devices=2,
        limit_val_batches=0,
        use_distributed_sampler=True,
    )
    trainer.fit(_RankData())
    (row,) = _rows(logger, "quant/act/alpha")
    # 16 elements of X plus 16 on level 1.
    shares = [(c * 16 + (16 if k == 1 else 0)) / 32 for k, c in enumerate(LEVEL_SHARES)]
    assert [float(row[f"quant/act/level_{k}"]) for k in range(4)] == pytest.approx(shares)
    assert float(row["quant/act/clipped"]) == pytest.approx(CLIPPED_SHARE / 2)


def test_mnist_w2a2_with_the_conversion_callbacks(tmp_path, mnist_root):
    data = MNISTDataModule(root=str(mnist_root), batch_size=64, subset=1024, flatten=True, download=False)
    logger = CSVLogger(tmp_path, name="csv")
    telemetry = QuantTelemetry(log_every_n_steps=4)
    # Telemetry listed first: it finds the quantizers in on_fit_start, after every callback's setup.
    callbacks = [telemetry, QuantizeActivations(bits=2), BlendedQuantWeights(bits=2, rho=1e-3)]
    trainer = _trainer(tmp_path, callbacks, logger, max_steps=12, limit_val_batches=0)
    trainer.fit(MLPClassifier(784, 64, 64, 10, momentum=0.9), datamodule=data)
    rows = _rows(logger, "quant/net.1/alpha")
    assert len(rows) == 3
    for row in rows:
        for act in ("net.1", "net.3"):
            shares = [float(row[f"quant/{act}/level_{k}"]) for k in range(4)]
            assert math.fsum(shares) == pytest.approx(1.0)
            assert 0 < float(row[f"quant/{act}/zero"]) < 1
            assert 0 <= float(row[f"quant/{act}/clipped"]) <= shares[3]
            assert float(row[f"quant/{act}/alpha"]) > 0
        for layer in ("net.0", "net.2", "net.4"):
            assert 0 <= float(row[f"quant/{layer}/flip_ratio"]) <= 1
            assert 0 < float(row[f"quant/{layer}/quant_error"]) < 1
            assert float(row[f"quant/{layer}/rho"]) == pytest.approx(1e-3)
    # lr 0.1 with momentum moves ternary codes of a freshly initialized net within 4 steps.
    assert any(float(r["quant/net.0/flip_ratio"]) > 0 for r in rows)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(log_every_n_steps=0), "log_every_n_steps"),
        (dict(log_every_n_steps=2.5), "log_every_n_steps"),
        (dict(log_every_n_steps=True), "log_every_n_steps"),
        (dict(collect_every_n_steps=0), "collect_every_n_steps"),
        (dict(enabled="yes"), "enabled"),
        (dict(log_levels=1), "log_levels"),
        (dict(occupancy_chart=None), "occupancy_chart"),
    ],
)
def test_arguments_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantTelemetry(**kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_that_do_not_log_never_synchronise(tmp_path):
    n = 4
    telemetry = QuantTelemetry(log_every_n_steps=n, occupancy_chart=False)

    class SyncGuard(pl.Callback):
        """Sync debug mode "error" from batch start; lifted just before telemetry's hook on logging steps."""

        def __init__(self, before: bool) -> None:
            self.before = before

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.before:
                torch.cuda.set_sync_debug_mode("error")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if not self.before or trainer.global_step % n == 0:
                torch.cuda.set_sync_debug_mode(0)

    model = Toy()
    logger = CSVLogger(tmp_path, name="csv")
    callbacks = [SyncGuard(before=True), telemetry, SyncGuard(before=False)]
    trainer = _trainer(tmp_path, callbacks, logger, accelerator="gpu", devices=1, limit_val_batches=0)
    try:
        trainer.fit(model, _loader(2 * n))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    rows = _rows(logger, "quant/act/alpha")
    assert len(rows) == 2
    numel = model.lin.parametrizations.weight.original.numel()
    assert float(rows[0]["quant/lin/flip_ratio"]) == pytest.approx(FLIPPED / numel)
    for row in rows:
        assert [float(row[f"quant/act/level_{k}"]) for k in range(4)] == pytest.approx(LEVEL_SHARES)
        assert float(row["quant/act/clipped"]) == pytest.approx(CLIPPED_SHARE)
