"""Reliability across the Lightning lifecycle: resume, crash, DDP, repeated fits, ckpt_path, other callbacks, NaN.

The Trainer tests drive a real ``lightning.Trainer`` on CPU (gloo DDP for the two-process test; the CUDA test
runs only where a GPU is present) with the conversion callbacks on a small real-MNIST convolutional network.
"""

from __future__ import annotations

import math
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from alpha_oracle import AlphaProbe, check_alpha_record
from lightning.pytorch.callbacks import (
    EarlyStopping,
    ModelCheckpoint,
    ModelPruning,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

import lightning_ste
from lightning_ste import BlendedQuantWeights, QuantizeActivations, QuantReLU
from lightning_ste.functional import ALPHA_FLOOR
from lightning_ste.inspect import quantized_layers
from lightning_ste.recipe import recipes_on

BATCH = 32
EPOCH_BATCHES = 3  # an epoch is 3 optimizer steps, so step 4 is in the middle of the second epoch


@cache
def mnist(root: str, n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    data = MNIST(root, train=True, download=False)
    x = data.data[:n].float().div(255).sub(0.1307).div(0.3081).unsqueeze(1)
    return x, data.targets[:n]


class ResumableLoader:
    """A fixed-order loader that Lightning can resume mid-epoch: it remembers how many batches it handed out.

    Lightning saves ``state_dict()`` of a loader with that interface into the checkpoint and calls
    ``load_state_dict`` before iterating again, so a resumed run skips the batches the epoch already used.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = BATCH) -> None:
        self.loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
        self.served = 0
        self._skip = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self.served = skip
        for i, batch in enumerate(self.loader):
            if i >= skip:
                self.served += 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = state["served"]


def train_loader(root: Path) -> ResumableLoader:
    x, y = mnist(str(root))
    n = BATCH * EPOCH_BATCHES
    return ResumableLoader(x[:n], y[:n])


def eval_loader(root: Path, n: int = 64) -> DataLoader:
    x, y = mnist(str(root))
    return DataLoader(TensorDataset(x[-n:], y[-n:]), batch_size=n)


class TinyNet(pl.LightningModule):
    """conv-BN-ReLU-conv-BN-F.relu-linear with affine-free BN (YLZ19); the optimizer holds the weights only
    (the callback adds the alphas). ``plain=True``: stateless SGD and no scheduler."""

    def __init__(self, lr: float = 0.05, plain: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 4, 5, stride=3)  # 8x8
        self.bn1 = nn.BatchNorm2d(4, affine=False)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2)  # 3x3
        self.bn2 = nn.BatchNorm2d(8, affine=False)
        self.fc = nn.Linear(72, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.fc(h.flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self) -> Any:
        weights = [p for n, p in self.named_parameters() if "alpha" not in n]
        if self.hparams.plain:
            return torch.optim.SGD(weights, lr=self.hparams.lr)
        optimizer = torch.optim.SGD(weights, lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def quant_callbacks() -> list[pl.Callback]:
    """Learned 2-bit alphas, ternary weights with a (rate, max) rho schedule that moves every epoch."""
    return [
        QuantizeActivations(bits=2, alpha="learned"),
        BlendedQuantWeights(bits=2, rho=0.01, rho_schedule=(2.0, 0.05)),
    ]


def make_trainer(tmp: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    settings: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        default_root_dir=tmp,
    )
    return pl.Trainer(callbacks=callbacks, **{**settings, **kwargs})


def quiet_fit(trainer: pl.Trainer, model: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the alpha param-group notice, num_workers hints
        trainer.fit(model, *args, **kwargs)


def alphas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.alpha.detach().clone() for n, m in model.named_modules() if isinstance(m, QuantReLU)}


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two checkpoints hold bit-identical model, optimizer, scheduler, callback and loop positions."""
    assert (a["global_step"], a["epoch"]) == (b["global_step"], b["epoch"])
    sa, sb = a["state_dict"], b["state_dict"]
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]) if torch.is_tensor(sa[k]) else sa[k] == sb[k], k
    assert_nested_equal(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert_nested_equal(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    for key in a["callbacks"]:
        if not key.startswith("ModelCheckpoint"):
            assert_nested_equal(a["callbacks"][key], b["callbacks"][key], key)
    assert a["lightning_ste"] == b["lightning_ste"]


def assert_nested_equal(a: Any, b: Any, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            assert_nested_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# -------------------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def uninterrupted(mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 steps in one run (3 epochs, the last one cut short), with checkpoints after steps 4 and 8."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    pl.seed_everything(0)
    every4 = ModelCheckpoint(dirpath=tmp, every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = make_trainer(tmp, [*quant_callbacks(), every4], max_steps=8)
    quiet_fit(trainer, TinyNet(), train_loader(mnist_root))
    assert trainer.global_step == 8
    return {"step4": tmp / "step=4.ckpt", "step8": tmp / "step=8.ckpt"}


def resume(root: Path, tmp: Path, ckpt: Path) -> dict[str, Any]:
    """A fresh model, fresh callbacks and a fresh Trainer continue ``ckpt`` up to step 8; its final checkpoint."""
    pl.seed_everything(123)  # a different seed: nothing may depend on the RNG state at resume
    every4 = ModelCheckpoint(dirpath=tmp / "resumed", every_n_train_steps=4, filename="{step}")
    trainer = make_trainer(tmp, [*quant_callbacks(), every4], max_steps=8)
    quiet_fit(trainer, TinyNet(), train_loader(root), ckpt_path=ckpt)
    assert trainer.global_step == 8
    return torch.load(tmp / "resumed" / "step=8.ckpt", weights_only=False)


def test_resume_mid_epoch_with_fresh_objects_is_bit_identical(mnist_root, tmp_path, uninterrupted):
    pl.seed_everything(0)
    last = ModelCheckpoint(dirpath=tmp_path / "first", save_last=True, every_n_train_steps=4)
    trainer = make_trainer(tmp_path, [*quant_callbacks(), last], max_steps=4)
    quiet_fit(trainer, TinyNet(), train_loader(mnist_root))
    half = torch.load(tmp_path / "first" / "last.ckpt", weights_only=False)
    assert (
        half["global_step"] == 4 and half["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    )
    assert half["callbacks"]["BlendedQuantWeights"] == {"rho": 0.04, "epoch": 1}  # rho of the second epoch
    assert len(half["optimizer_states"][0]["param_groups"]) == 2  # weights + the alpha group

    got = resume(mnist_root, tmp_path, tmp_path / "first" / "last.ckpt")
    expected = torch.load(uninterrupted["step8"], weights_only=False)
    assert_same_training_state(got, expected)
    assert got["callbacks"]["BlendedQuantWeights"] == {"rho": 0.05, "epoch": 2}
    assert got["lr_schedulers"][0]["_step_count"] == 9 and got["lr_schedulers"][0]["last_epoch"] == 8
    momentum = got["optimizer_states"][0]["state"]
    assert len(momentum) == sum(1 for _ in TinyNet().parameters()) + 2  # every weight, bias and both alphas
    # Not vacuous: the state did move between step 4 and step 8.
    assert not torch.equal(half["state_dict"]["act.alpha"], got["state_dict"]["act.alpha"])
    key = "fc.parametrizations.weight.original"
    assert not torch.equal(half["state_dict"][key], got["state_dict"][key])


def test_restores_are_strict_a_missing_and_an_unexpected_key_fail(mnist_root, tmp_path, uninterrupted):
    """load_from_checkpoint and ckpt_path refuse a state_dict with one key gone and one foreign key; the
    rho schedule's callback state refuses a missing and an unexpected key too."""
    ckpt = torch.load(uninterrupted["step4"], weights_only=False)
    state = ckpt["state_dict"]
    state["fc.extra"] = state.pop("fc.bias")
    torch.save(ckpt, tmp_path / "bad.ckpt")
    both = r"(?s)Missing key\(s\) in state_dict: .fc\.bias.*Unexpected key\(s\) in state_dict: .fc\.extra"
    with pytest.raises(RuntimeError, match=both):
        lightning_ste.load_from_checkpoint(TinyNet, tmp_path / "bad.ckpt")
    model = TinyNet()
    trainer = make_trainer(tmp_path, quant_callbacks(), max_steps=8)
    with pytest.raises(RuntimeError, match=both):
        quiet_fit(trainer, model, train_loader(mnist_root), ckpt_path=tmp_path / "bad.ckpt")

    ckpt = torch.load(uninterrupted["step4"], weights_only=False)
    ckpt["callbacks"]["BlendedQuantWeights"] = {"rho": 0.04, "epochs": 1}
    torch.save(ckpt, tmp_path / "bad_callback.ckpt")
    trainer = make_trainer(tmp_path, quant_callbacks(), max_steps=8)
    with pytest.raises(ValueError, match=r"exactly the keys \['epoch', 'rho'\], got \['epochs', 'rho'\]"):
        quiet_fit(trainer, TinyNet(), train_loader(mnist_root), ckpt_path=tmp_path / "bad_callback.ckpt")

    ckpt = torch.load(uninterrupted["step4"], weights_only=False)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("QuantizeActivations")]
    state = ckpt["callbacks"][key]
    state["site_names"] = state.pop("sites")
    torch.save(ckpt, tmp_path / "bad_activations.ckpt")
    trainer = make_trainer(tmp_path, quant_callbacks(), max_steps=8)
    with pytest.raises(
        ValueError, match=r"exactly the keys \['arguments', 'sites'\], got \['arguments', 'site_names'\]"
    ):
        quiet_fit(trainer, TinyNet(), train_loader(mnist_root), ckpt_path=tmp_path / "bad_activations.ckpt")

    ckpt = torch.load(uninterrupted["step4"], weights_only=False)
    extra = [k for k in ckpt["state_dict"] if k.endswith("_extra_state")]
    assert extra, "the QuantReLUs store their calibration count as extra state"
    ckpt["state_dict"][extra[0]] = {"calibrated": 1}
    torch.save(ckpt, tmp_path / "bad_extra.ckpt")
    with pytest.raises(ValueError, match=r"exactly the key \['calibrated_batches'\], got \['calibrated'\]"):
        lightning_ste.load_from_checkpoint(TinyNet, tmp_path / "bad_extra.ckpt")


class CrashAt(pl.Callback):
    """Raises from ``on_train_batch_end`` once ``global_step`` reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


def test_crash_mid_epoch_leaves_a_loadable_checkpoint_and_resume_matches(mnist_root, tmp_path, uninterrupted):
    pl.seed_everything(0)
    last = ModelCheckpoint(dirpath=tmp_path / "first", save_last=True, every_n_train_steps=2)
    model = TinyNet()
    trainer = make_trainer(tmp_path, [*quant_callbacks(), last, CrashAt(5)], max_steps=8)
    with pytest.raises(RuntimeError, match="simulated crash at step 5"):
        quiet_fit(trainer, model, train_loader(mnist_root))
    assert trainer.global_step == 5 and trainer.state.status == "interrupted"

    # The last checkpoint is the one of step 4, whole: it loads without a Trainer, equal to the clean run's.
    ckpt = tmp_path / "first" / "last.ckpt"
    stored = torch.load(ckpt, weights_only=False)
    clean = torch.load(uninterrupted["step4"], weights_only=False)
    assert stored["global_step"] == 4
    assert_same_training_state(stored, clean)
    loaded = lightning_ste.load_from_checkpoint(TinyNet, ckpt)
    reference = lightning_ste.load_from_checkpoint(TinyNet, uninterrupted["step4"])
    x = eval_loader(mnist_root).dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))

    got = resume(mnist_root, tmp_path, ckpt)
    assert_same_training_state(got, torch.load(uninterrupted["step8"], weights_only=False))


# ----------------------------------------------------------------------------------------------- DDP


class DumpRank(pl.Callback):
    """Each process writes its latent weights, alphas and eval outputs on ``x`` at the end of training."""

    def __init__(self, folder: Path, x: torch.Tensor) -> None:
        self.folder, self.x = folder, x

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.eval()
        with torch.no_grad():
            out = pl_module(self.x.to(pl_module.device))
        pl_module.train()
        state = {
            "latent": {n: w.detach().clone() for n, _, w, _ in quantized_layers(pl_module)},
            "alpha": alphas(pl_module),
            "out": out,
            "step": trainer.global_step,
        }
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def test_ddp_two_processes_agree_and_their_checkpoint_loads_in_one_process(mnist_root, tmp_path):
    pl.seed_everything(0)
    x_eval = eval_loader(mnist_root).dataset.tensors[0]
    x, y = mnist(str(mnist_root))
    data = DataLoader(
        TensorDataset(x[:256], y[:256]), batch_size=16, shuffle=True
    )  # distinct shards per rank
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    trainer = make_trainer(
        tmp_path,
        [*quant_callbacks(), ckpt, DumpRank(tmp_path, x_eval), AlphaProbe(bits=2, folder=tmp_path)],
        strategy="ddp_spawn",
        devices=2,
        max_steps=3,
        deterministic=False,
    )
    quiet_fit(trainer, TinyNet(), data)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["step"] == r1["step"] == 3
    assert sorted(r0["latent"]) == ["conv1", "conv2", "fc"] and sorted(r0["alpha"]) == ["act", "relu_fx_0"]
    for part in ("latent", "alpha"):
        for name in r0[part]:
            assert torch.equal(r0[part][name], r1[part][name]), (part, name)
    # Step 1 on each rank: alpha.grad is the mean over both ranks of the proxy gradient of each rank's own
    # inputs, and SGD (lr 0.05, the callback's group without weight decay) moved alpha by lr times it.
    for rank in (0, 1):
        probe = torch.load(tmp_path / f"alpha_probe_rank{rank}.pt")
        assert sorted(probe) == ["act", "relu_fx_0"]
        check_alpha_record(probe)
    assert all(abs(float(a) - 0.6511) > 1e-6 for a in r0["alpha"].values())  # and kept training
    # (Eval outputs may differ between ranks: each rank's BatchNorm running statistics saw its own shard.)

    # The checkpoint the DDP run wrote rebuilds the model in this single process, with rank 0's outputs.
    loaded = lightning_ste.load_from_checkpoint(TinyNet, tmp_path / "ckpt" / "last.ckpt")
    with torch.no_grad():
        assert torch.equal(loaded(x_eval), r0["out"])
    for name, latent in r0["latent"].items():
        assert torch.equal(loaded.get_submodule(name).parametrizations.weight.original, latent)


# ---------------------------------------------------------------------------- repeated fits, ckpt_path


def plain_loader(root: Path) -> DataLoader:
    x, y = mnist(str(root))
    n = BATCH * EPOCH_BATCHES
    return DataLoader(TensorDataset(x[:n], y[:n]), batch_size=BATCH)


def test_fit_twice_on_the_same_objects_continues_like_one_fit(mnist_root, tmp_path):
    """Same model, callbacks and Trainer fitted twice (1 epoch, then on to 2) == one 2-epoch fit (stateless SGD)."""
    pl.seed_everything(0)
    model, callbacks = TinyNet(plain=True), quant_callbacks()
    trainer = make_trainer(tmp_path, callbacks, max_epochs=1)
    quiet_fit(trainer, model, plain_loader(mnist_root))
    after_one = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    trainer.fit_loop.max_epochs = 2
    quiet_fit(trainer, model, plain_loader(mnist_root))
    assert trainer.global_step == 2 * EPOCH_BATCHES
    # One conversion of each kind; the alpha group is added to the new optimizer once, not twice.
    assert [r["kind"] for r in recipes_on(model)] == ["activations", "weights"]
    assert [n for n, *_ in quantized_layers(model)] == ["conv1", "conv2", "fc"]
    assert sorted(alphas(model)) == ["act", "relu_fx_0"]
    assert len(trainer.optimizers[0].param_groups) == 2
    assert callbacks[1].state_dict() == {"rho": 0.04, "epoch": 1}

    pl.seed_everything(0)
    once = TinyNet(plain=True)
    quiet_fit(make_trainer(tmp_path, quant_callbacks(), max_epochs=2), once, plain_loader(mnist_root))
    a, b = model.state_dict(), once.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k], k
    assert not torch.equal(after_one["act.alpha"], a["act.alpha"])  # the second fit trained


CONFIGS = {
    "activations": lambda: [QuantizeActivations(bits=2)],
    "weights": lambda: [BlendedQuantWeights(bits=1, rho=0.01)],
    "both": quant_callbacks,
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_validate_test_predict_with_best_and_a_path_and_load_from_checkpoint(mnist_root, tmp_path, config):
    pl.seed_everything(0)
    every = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=-1, filename="{epoch}")
    trainer = make_trainer(tmp_path, [*CONFIGS[config](), every], max_epochs=2)
    model, val = TinyNet(), eval_loader(mnist_root)
    quiet_fit(trainer, model, plain_loader(mnist_root), val)
    x, y = val.dataset.tensors
    with torch.no_grad():
        final = model.eval()(x)
    first = tmp_path / "epoch=0.ckpt"
    n_act, n_w = (0 if config == "weights" else 2), (0 if config == "activations" else 3)

    # "best" on the Trainer that fitted; a path on a fresh model, fresh callbacks and a fresh Trainer.
    for t, m, ckpt, path in (
        (trainer, model, "best", Path(every.best_model_path)),
        (make_trainer(tmp_path, CONFIGS[config]()), TinyNet(), first, first),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (metrics,) = t.validate(m, val, ckpt_path=ckpt, verbose=False)
            (tested,) = t.test(m, val, ckpt_path=ckpt, verbose=False)
            predicted = torch.cat(t.predict(m, val, ckpt_path=ckpt))
        loaded = lightning_ste.load_from_checkpoint(TinyNet, path)
        assert len(alphas(loaded)) == n_act and len(list(quantized_layers(loaded))) == n_w
        with torch.no_grad():
            expected = loaded(x)
        assert torch.equal(predicted, expected)
        assert metrics["val_loss"] == pytest.approx(float(F.cross_entropy(expected, y)), rel=1e-6)
        assert tested["test_acc"] == pytest.approx(float((expected.argmax(1) == y).float().mean()))
        assert len(recipes_on(m)) == len(CONFIGS[config]())  # evaluation never converts again
    assert not torch.equal(predicted, final)  # epoch 0's weights, not the ones in memory after fit


# ------------------------------------------------------------------------------ Lightning's callbacks


@pytest.mark.parametrize("ours_first", [True, False])
def test_together_with_pruning_checkpoint_early_stopping_and_swa(mnist_root, tmp_path, ours_first):
    """Lightning's callbacks set up before or after ours: pruning reaches q(W), SWA averages the converted model."""
    pl.seed_everything(0)
    pruning = ModelPruning("l1_unstructured", amount=0.3, parameter_names=["weight"], verbose=0)
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=1)
    early = EarlyStopping(monitor="val_loss", patience=5)
    ckpt = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_last=True)
    theirs: list[pl.Callback] = [swa, pruning, early, ckpt]
    callbacks = [*quant_callbacks(), *theirs] if ours_first else [*theirs, *quant_callbacks()]
    model = TinyNet(plain=True)  # SWA swaps in its own LR schedule: one plain SGD param group to start from
    trainer = make_trainer(tmp_path, callbacks, max_epochs=3)
    quiet_fit(trainer, model, plain_loader(mnist_root), eval_loader(mnist_root))

    layers = {name: layer for name, layer, _, _ in quantized_layers(model)}
    assert list(layers) == ["conv1", "conv2", "fc"] and sorted(alphas(model)) == ["act", "relu_fx_0"]
    # Pruning (made permanent at train end) zeroed latent weights, and q keeps exactly those at 0.
    latent = torch.cat(
        [layer.parametrizations.weight.original.detach().flatten() for layer in layers.values()]
    )
    used = torch.cat([layer.weight.detach().flatten() for layer in layers.values()])
    assert 0.5 < float((latent == 0).float().mean()) < 0.8  # 1 - 0.7**3 of all weights, globally
    assert bool((used[latent == 0] == 0).all())
    assert not any(name.endswith(("_orig", "_mask")) for name in model.state_dict())
    # SWA averaged the converted model: its copy has the same parameters, in the same order.
    assert [n for n, _ in swa._average_model.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert int(swa.n_averaged) >= 2  # it did average
    assert math.isfinite(float(early.best_score)) and Path(ckpt.best_model_path).exists()

    trainer.save_checkpoint(tmp_path / "final.ckpt")
    loaded = lightning_ste.load_from_checkpoint(TinyNet, tmp_path / "final.ckpt", plain=True)
    x = eval_loader(mnist_root).dataset.tensors[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    best = lightning_ste.load_from_checkpoint(TinyNet, ckpt.best_model_path)
    assert [n for n, *_ in quantized_layers(best)] == list(layers)


@pytest.mark.parametrize("ours_first", [True, False])
def test_model_pruning_prunes_the_latent_weights_with_lottery_ticket_and_fits_again(
    mnist_root, tmp_path, ours_first
):
    """ModelPruning's defaults (global L1, lottery ticket reset) act on the latent W whatever the order."""
    pl.seed_everything(0)
    model = TinyNet(plain=True)
    initial = {n: model.get_submodule(n).weight.detach().clone() for n in ("conv1", "conv2", "fc")}
    pruning = ModelPruning("l1_unstructured", amount=0.3, parameter_names=["weight"], verbose=0)
    weights = BlendedQuantWeights(bits=2, rho=0.05)
    callbacks = [weights, pruning] if ours_first else [pruning, weights]
    quiet_fit(make_trainer(tmp_path, callbacks, max_epochs=1), model, plain_loader(mnist_root))
    layers = {name: layer for name, layer, _, _ in quantized_layers(model)}
    pruned = 0
    for name, layer in layers.items():
        latent = layer.parametrizations.weight.original.detach()
        kept = latent != 0
        pruned += int((~kept).sum())
        assert torch.equal(latent[kept], initial[name][kept])  # the lottery ticket: back to the initial W
        assert bool((layer.weight.detach()[~kept] == 0).all())  # and q keeps the pruned weights at 0
    total = sum(layer.weight.numel() for layer in layers.values())
    assert pruned == round(0.3 * total)
    # ModelPruning holds (layer, "weight") again, so the same objects fit again.
    assert all(name == "weight" for _, name in pruning._parameters_to_prune)
    quiet_fit(make_trainer(tmp_path, callbacks, max_epochs=1), model, plain_loader(mnist_root))
    assert [n for n, *_ in quantized_layers(model)] == list(layers)
    zeros = sum(int((layer.parametrizations.weight.original == 0).sum()) for layer in layers.values())
    assert zeros >= round(0.3 * total)  # pruned again, on the latent W


class WithAuxHead(TinyNet):
    """An extra quantized head that the training loss never uses: it gets no gradient."""

    def __init__(self) -> None:
        super().__init__(plain=True)
        self.aux = nn.Linear(72, 3)


def test_a_latent_weight_without_gradient_is_neither_stepped_nor_blended(mnist_root, tmp_path):
    pl.seed_everything(0)
    model = WithAuxHead()
    before, fc_before = model.aux.weight.detach().clone(), model.fc.weight.detach().clone()
    weights = BlendedQuantWeights(bits=1, rho=0.5)
    quiet_fit(make_trainer(tmp_path, [weights], max_steps=3), model, plain_loader(mnist_root))
    assert [n for n, *_ in quantized_layers(model)] == ["conv1", "conv2", "fc", "aux"]
    assert torch.equal(model.aux.parametrizations.weight.original.detach(), before)
    assert not torch.equal(model.fc.parametrizations.weight.original.detach(), fc_before)  # the others moved


# --------------------------------------------------------------------------------------- NaN and Inf


def test_nan_and_inf_reaching_the_quantizers_propagate_through_a_trained_model(mnist_root, tmp_path):
    pl.seed_everything(0)
    model = TinyNet()
    quiet_fit(make_trainer(tmp_path, quant_callbacks(), max_steps=2), model, plain_loader(mnist_root))
    model.eval()
    x = eval_loader(mnist_root, 4).dataset.tensors[0].clone()
    x[1, 0, 10:14, 10:14] = float("nan")
    x[2, 0, 10:14, 10:14] = float("inf")
    x[3, 0, 10:14, 10:14] = -float("inf")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: seen.append((i[0].detach(), o.detach())))
        for m in model.modules()
        if isinstance(m, QuantReLU)
    ]
    with torch.no_grad():
        out = model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    assert bool((seen[0][0] == float("inf")).any()) and bool((seen[0][0] == -float("inf")).any())
    for inputs, outputs in seen:  # (the second site sees inf - inf = NaN from conv2 instead of inf)
        nan, inf = torch.isnan(inputs), torch.isinf(inputs)
        assert bool(nan.any())
        assert bool(torch.isnan(outputs[nan]).all())  # never a level
        assert torch.equal(outputs[inf], inputs[inf])
        assert bool(torch.isfinite(outputs[~nan & ~inf]).all())
    assert bool(torch.isfinite(out[0]).all())  # the clean sample is untouched (BN in eval mode)
    assert not bool(torch.isfinite(out[1:]).any())  # every logit of every poisoned sample is not finite

    # A latent weight or an alpha that became NaN makes q(W) and the activations NaN, not some level.
    with torch.no_grad():
        model.fc.parametrizations.weight.original[3, 5] = float("nan")
        assert bool(torch.isnan(model.fc.weight[3, 5]))
        assert bool(torch.isnan(model(x[:1])).all())
        model.fc.parametrizations.weight.original[3, 5] = 0.0
        model.act.alpha.fill_(float("nan"))
        assert bool(torch.isnan(model(x[:1])).all())


def _quantized_at_bad_entry(
    w_shape, bad, bits, per_channel, ternary_scale, binary_scale
) -> list[torch.Tensor]:
    """q(W)[3] through the module and through weight_codes, for a W whose entry 3 is ``bad``."""
    from lightning_ste.functional import weight_codes
    from lightning_ste.quantizers.weight import WeightQuantizer

    w = torch.randn(w_shape)
    w.view(-1)[3] = bad
    q = WeightQuantizer(bits, per_channel, ternary_scale, binary_scale)(w)
    codes, scale = weight_codes(w, bits, per_channel, ternary_scale, binary_scale)
    return [q.view(-1)[3], (codes * scale).view(-1)[3]]


SHAPES = ((7,), (6, 5), (4, 3, 3, 3), (64, 128))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_quantizers_never_map_nan_or_inf_onto_a_level(bits, per_channel):
    for bad in (float("nan"), float("inf"), -float("inf")):
        for shape in SHAPES:
            for ternary_scale, binary_scale in (("twn", "mean"), ("bcgd_code", "median")):
                if bits == 1 and binary_scale == "median" and math.isinf(bad):
                    continue  # the known bug below
                for got in _quantized_at_bad_entry(
                    shape, bad, bits, per_channel, ternary_scale, binary_scale
                ):
                    assert not bool(torch.isfinite(got)), (bad, shape, ternary_scale, binary_scale)


@pytest.mark.parametrize("per_channel", [False, True])
def test_binary_median_scale_does_not_map_inf_onto_a_level(per_channel):
    for bad in (float("inf"), -float("inf")):
        for shape in SHAPES:
            for got in _quantized_at_bad_entry(shape, bad, 1, per_channel, "twn", "median"):
                assert not bool(torch.isfinite(got)), (bad, shape)


# ----------------------------------------------------------------------------------- alpha at floor


class Shrink(pl.LightningModule):
    """loss = sum of the first ReLU's outputs: its alpha is driven down to the floor; the second is unused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 32).requires_grad_(False)  # frozen: the inputs of the ReLUs stay as they are
        self.first, self.second = nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.fc(x.flatten(1))
        return self.first(h), self.second(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0])[0].sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.5)


class CountFloorWarnings(pl.Callback):
    """Records, after each training batch (and after QuantizeActivations' hooks), the floor warnings so far."""

    def __init__(self, caught: list[warnings.WarningMessage]) -> None:
        self.caught = caught
        self.after_step: dict[int, int] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.after_step[trainer.global_step] = sum("floor" in str(w.message) for w in self.caught)


@pytest.mark.parametrize("log_every_n_steps", [1, 50])
def test_alpha_collapsing_to_its_floor_warns_once_with_the_site_name(mnist_root, tmp_path, log_every_n_steps):
    pl.seed_everything(0)
    model, callback = Shrink(), QuantizeActivations(bits=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        counter = CountFloorWarnings(caught)
        trainer = make_trainer(
            tmp_path, [callback, counter], max_epochs=2, log_every_n_steps=log_every_n_steps
        )
        trainer.fit(model, plain_loader(mnist_root))
    assert trainer.global_step == 2 * EPOCH_BATCHES
    assert float(model.first.alpha.detach()) <= ALPHA_FLOOR < float(model.second.alpha.detach())
    messages = [str(w.message) for w in caught if "floor" in str(w.message)]
    assert len(messages) == 1, messages  # once, over 6 steps and 2 epoch ends
    assert "alpha of first collapsed to its floor 0.001" in messages[0] and "second" not in messages[0]
    # alpha is 0.6511 - 0.5 k after k steps: below the floor after step 2. With a log step every step the
    # warning comes right then; otherwise alpha is read only at the epoch's end (after step 3).
    expected = {1: 0, 2: 1, 3: 1, 4: 1} if log_every_n_steps == 1 else {1: 0, 2: 0, 3: 0, 4: 1}
    assert {k: counter.after_step[k] for k in expected} == expected


# ------------------------------------------------------------------------------------------- on CUDA


class SyncGuard(pl.Callback):
    """``start``: sync debug mode "error" from batch start; ``log_steps``: lifted on logging steps before
    QuantizeActivations reads alpha; ``end`` (last): records the mode the step ran under, then lifts it."""

    def __init__(self, role: str, every: int) -> None:
        self.role, self.every, self.modes = role, every, []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.role == "start":
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.role == "log_steps" and trainer.global_step % self.every == 0:
            torch.cuda.set_sync_debug_mode(0)
        if self.role == "end":
            self.modes.append(torch.cuda.get_sync_debug_mode())
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_cuda_steps_that_do_not_log_never_synchronise_with_both_callbacks(tmp_path, precision):
    """Forward, STE backward, blend, alpha-group and alpha-floor hooks: no host sync outside logging steps."""
    every = 4
    pl.seed_everything(0)
    x, y = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    model, end = TinyNet(), SyncGuard("end", every)
    callbacks = [SyncGuard("start", every), SyncGuard("log_steps", every), *quant_callbacks(), end]
    trainer = make_trainer(
        tmp_path,
        callbacks,
        accelerator="gpu",
        max_steps=3 * every,
        log_every_n_steps=every,
        precision=precision,
        deterministic=False,
    )
    try:
        quiet_fit(trainer, model, DataLoader(TensorDataset(x, y), batch_size=32))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.global_step == 3 * every
    assert end.modes.count(2) == 3 * every - 3  # every non-logging step ran under "error"
    assert all(abs(float(a) - 0.6511) > 1e-6 for a in alphas(model).values())
