"""BlendedQuantWeights inside a real lightning.Trainer: BCGD exactness, AMP skip, schedule, resume, DDP, errors."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from fixtures import QUIET
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_ste import BlendedQuantWeights
from lightning_ste.functional import weight_codes
from lightning_ste.inspect import quantized_layers
from lightning_ste.recipe import recipes_on
from lightning_ste.surgery.weight_params import apply_recipe

TRAINER_KW: dict[str, Any] = {**QUIET, "num_sanity_val_steps": 0}


class Net(L.LightningModule):
    """Linear-ReLU-BatchNorm-Linear classifier; ``optimizer`` is "sgd" (momentum, weight decay) or "adamw"."""

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1, width: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(6, width)
        self.norm = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(torch.relu(self.fc1(x))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-2)


def make_data(n: int = 32, dtype: torch.dtype = torch.float64) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g))


def quantize(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    codes, scale = weight_codes(w, bits, per_channel)
    return codes * scale


def simulate(
    init: dict[str, torch.Tensor],
    data: TensorDataset,
    steps: int,
    rho: float,
    optimizer: str,
    lr: float,
    bits: int = 1,
    per_channel: bool = False,
    accumulate: int = 1,
    batch_size: int = 4,
) -> dict[str, torch.Tensor]:
    """Plain PyTorch docs/math.md §3: forward/backward at q(W), W~ = (1-ρ)W + ρ q(W), then the optimizer steps from W~."""
    p = {
        k: v.detach().clone().requires_grad_(v.is_floating_point())
        for k, v in init.items()
        if "running" not in k
    }
    p = {k: v for k, v in p.items() if "num_batches" not in k}
    running = {k: init[k].clone() for k in ("norm.running_mean", "norm.running_var")}
    latents = ("fc1.weight", "fc2.weight")
    params = list(p.values())
    if optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-2)
    batches = iter(DataLoader(data, batch_size=batch_size, shuffle=False))
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = next(batches)
            q = {k: quantize(p[k].detach(), bits, per_channel).requires_grad_() for k in latents}
            h = torch.relu(F.linear(x, q["fc1.weight"], p["fc1.bias"]))
            h = F.batch_norm(h, running["norm.running_mean"], running["norm.running_var"], p["norm.weight"],
                             p["norm.bias"], training=True, momentum=0.1)  # fmt: skip
            loss = F.cross_entropy(F.linear(h, q["fc2.weight"], p["fc2.bias"]), y) / accumulate
            loss.backward()
            for k in latents:  # the coarse gradient at q(W) reaches W unchanged
                p[k].grad = q[k].grad if p[k].grad is None else p[k].grad + q[k].grad
        with torch.no_grad():
            for k in latents:
                w = p[k]
                w.copy_((1 - rho) * w + rho * quantize(w, bits, per_channel))
        opt.step()
    return {k: v.detach() for k, v in p.items()}


def fit_and_compare(
    rho: float,
    optimizer: str,
    lr: float,
    steps: int,
    bits: int = 1,
    per_channel: bool = False,
    accumulate: int = 1,
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = Net(optimizer, lr).double()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    data = make_data()
    cb = BlendedQuantWeights(bits=bits, rho=rho, per_channel=per_channel)
    trainer = L.Trainer(
        max_steps=steps, callbacks=[cb], precision="64-true", accumulate_grad_batches=accumulate, **TRAINER_KW
    )
    trainer.fit(model, DataLoader(data, batch_size=4, shuffle=False))
    expected = simulate(init, data, steps, rho, optimizer, lr, bits, per_channel, accumulate)
    got = {name + ".weight": latent.detach() for name, _, latent, _ in quantized_layers(model)}
    assert set(got) == {"fc1.weight", "fc2.weight"}
    for k, v in got.items():
        assert v.dtype == torch.float64
        torch.testing.assert_close(v, expected[k], rtol=0, atol=1e-12)
    for k in ("fc1.bias", "fc2.bias", "norm.weight", "norm.bias"):
        torch.testing.assert_close(model.state_dict()[k], expected[k], rtol=0, atol=1e-12)
    return expected


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in ("fc1.weight", "fc2.weight"))


def test_sgd_momentum_weight_decay_matches_spec_simulation() -> None:
    blended = fit_and_compare(rho=0.05, optimizer="sgd", lr=0.1, steps=6)
    # The comparison can tell BCGD from BinaryConnect: the two differ far above the 1e-12 tolerance.
    torch.manual_seed(0)
    init = Net("sgd", 0.1).double().state_dict()
    assert max_diff(blended, simulate(init, make_data(), 6, 0.0, "sgd", 0.1)) > 1e-4


def test_adamw_ternary_per_channel_matches_spec_simulation() -> None:
    fit_and_compare(rho=0.05, optimizer="adamw", lr=0.01, steps=5, bits=2, per_channel=True)


def test_gradient_accumulation_blends_once_per_optimizer_step() -> None:
    got = fit_and_compare(rho=0.1, optimizer="sgd", lr=0.1, steps=3, bits=3, accumulate=2)
    torch.manual_seed(0)
    init = Net("sgd", 0.1).double().state_dict()
    # Blending at every micro-batch instead would land elsewhere.
    twice = simulate(init, make_data(), 3, 1 - 0.9**2, "sgd", 0.1, bits=3, accumulate=2)
    assert max_diff(got, twice) > 1e-6


def test_rho_zero_is_binaryconnect() -> None:
    fit_and_compare(rho=0.0, optimizer="sgd", lr=0.1, steps=6)


class RhoRecorder(L.Callback):
    def __init__(self, bcgd: BlendedQuantWeights) -> None:
        self.bcgd, self.seen = bcgd, {}

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.seen.setdefault(trainer.current_epoch, set()).add(self.bcgd.rho)


def test_rate_max_schedule_reaches_expected_rho_each_epoch() -> None:
    cb = BlendedQuantWeights(rho=0.01, rho_schedule=(2.0, 0.05))
    rec = RhoRecorder(cb)
    trainer = L.Trainer(max_epochs=4, limit_train_batches=2, callbacks=[cb, rec], **TRAINER_KW)
    trainer.fit(Net(), DataLoader(make_data(dtype=torch.float32), batch_size=4))
    assert rec.seen == {0: {0.02}, 1: {0.04}, 2: {0.05}, 3: {0.05}}
    assert cb.state_dict() == {"rho": 0.05, "epoch": 3}


class SkipProbe(Net):
    """Injects an inf gradient at step 1 and records latent weights and the loss scale around each step."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.records: list[tuple[bool, bool, bool]] = []

    def on_after_backward(self) -> None:
        if self.trainer.global_step == 1:
            self.fc1.parametrizations.weight.original.grad[0, 0] = float("inf")
        self._before = [latent.detach().clone() for *_, latent, _ in quantized_layers(self)]
        self._scale = self.trainer.precision_plugin.scaler.get_scale()

    def on_train_batch_end(self, *args: Any) -> None:
        after = [
            (latent.detach(), q.quantize(b))
            for (*_, latent, q), b in zip(quantized_layers(self), self._before)
        ]
        skipped = self.trainer.precision_plugin.scaler.get_scale() < self._scale
        unchanged = all(torch.equal(w, b) for (w, _), b in zip(after, self._before))
        blend_would_move = all(not torch.equal(qb, b) for (_, qb), b in zip(after, self._before))
        self.records.append((skipped, unchanged, blend_would_move))


def test_16_mixed_skipped_step_is_not_blended() -> None:
    """16-mixed with a real CPU GradScaler in the Trainer: the step the scaler skips leaves W unblended."""
    model = SkipProbe()
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**4))
    trainer = L.Trainer(max_steps=4, callbacks=[BlendedQuantWeights(rho=0.5)], plugins=[plugin], **TRAINER_KW)
    trainer.fit(model, DataLoader(make_data(dtype=torch.float32), batch_size=4))
    skipped = [r for r in model.records if r[0]]
    ran = [r for r in model.records if not r[0]]
    assert len(model.records) == 4 and len(skipped) >= 1 and len(ran) >= 1
    assert model.records[1][0]  # the injected inf made the scaler skip that step
    assert all(unchanged and would_move for _, unchanged, would_move in skipped)
    assert not any(unchanged for _, unchanged, _ in ran)


def test_bf16_mixed_trains_and_eval_uses_quantized_weights() -> None:
    model = Net(lr=0.05)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=4, limit_val_batches=2, callbacks=[BlendedQuantWeights()],
        precision="bf16-mixed", **TRAINER_KW,
    )  # fmt: skip
    data = DataLoader(make_data(dtype=torch.float32), batch_size=4)
    trainer.fit(model, data, data)
    assert all(torch.isfinite(latent).all() for *_, latent, _ in quantized_layers(model))
    assert torch.isfinite(torch.tensor(trainer.callback_metrics["val_loss"]))
    assert all(latent.dtype == torch.float32 for *_, latent, _ in quantized_layers(model))
    w = model.fc1.weight.detach()
    assert w.abs().unique().numel() == 1  # binary: ±δ
    torch.testing.assert_close(w, quantize(model.fc1.parametrizations.weight.original.detach(), 1))
    assert list(model.fc1.parametrizations) == ["weight"]  # the bias stays float
    assert not hasattr(model.norm, "parametrizations")


def test_second_fit_does_not_convert_again() -> None:
    model = Net()
    cb = BlendedQuantWeights(rho=0.1)
    data = DataLoader(make_data(dtype=torch.float32), batch_size=4)
    L.Trainer(max_steps=2, callbacks=[cb], **TRAINER_KW).fit(model, data)
    L.Trainer(max_steps=2, callbacks=[cb], **TRAINER_KW).fit(model, data)
    L.Trainer(callbacks=[cb], **TRAINER_KW).validate(model, data, verbose=False)
    assert len(recipes_on(model)) == 1
    assert [n for n, *_ in quantized_layers(model)] == ["fc1", "fc2"]


# ------------------------------------------------------------------------------------ keep_first_last


class BackwardsNet(Net):
    """Definition order out, mid, inp; execution order inp, mid, out."""

    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        self.hparams.update(optimizer="sgd", lr=0.1)
        self.out = nn.Linear(8, 3)
        self.mid = nn.Linear(8, 8)
        self.inp = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_keep_first_last_keeps_first_and_last_in_execution_order() -> None:
    handler = _Records()
    loggers = [logging.getLogger("lightning.pytorch"), logging.getLogger("lightning.fabric")]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        model = BackwardsNet()
        trainer = L.Trainer(max_steps=1, callbacks=[BlendedQuantWeights(keep_first_last=True)], **TRAINER_KW)
        trainer.fit(model, DataLoader(make_data(dtype=torch.float32), batch_size=4))
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
    assert [n for n, *_ in quantized_layers(model)] == ["mid"]
    assert recipes_on(model)[0]["sites"] == ["mid"]
    log = "\n".join(handler.messages)
    assert "keep_first_last kept in float: inp, out" in log
    assert "quantize  mid" in log


def test_dry_run_prints_plan_and_trains_float() -> None:
    model = Net()
    keys = list(model.state_dict())
    trainer = L.Trainer(max_steps=1, callbacks=[BlendedQuantWeights(dry_run=True)], **TRAINER_KW)
    trainer.fit(model, DataLoader(make_data(dtype=torch.float32), batch_size=4))
    assert list(model.state_dict()) == keys and not recipes_on(model)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"rho": -0.1}, "rho"),
        ({"rho": 1.5}, "rho"),
        ({"rho": float("nan")}, "rho"),
        ({"rho_schedule": lambda epoch: "fast"}, "rho_schedule"),
        ({"rho_schedule": (1.01,)}, "rho_schedule"),
        ({"include": 3}, "include"),
        ({"ternary_scale": "nope"}, "ternary_scale"),
        ({"layer_types": nn.ReLU()}, "layer_types"),
        ({"dry_run": "yes"}, "dry_run"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        BlendedQuantWeights(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"include": "conv*"}, "include"),
        ({"exclude": "fc*"}, "exclude"),
        ({"layer_types": (nn.Conv2d,)}, "layer_types"),
    ],
)
def test_nothing_selected_fails_at_setup_with_model_unchanged(kwargs: dict, name: str) -> None:
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=1, callbacks=[BlendedQuantWeights(**kwargs)], **TRAINER_KW)
    with pytest.raises(ValueError, match=f"`{name}`"):
        trainer.fit(model, DataLoader(make_data(dtype=torch.float32), batch_size=4))
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not recipes_on(model)


# -------------------------------------------------------------------------------------- checkpoints


def _fit(
    tmp: Path, max_epochs: int, cb: BlendedQuantWeights, ckpt: Path | None = None, save: Path | None = None
) -> Net:
    torch.manual_seed(0)
    model = Net(lr=0.05)
    trainer = L.Trainer(
        max_epochs=max_epochs, callbacks=[cb], deterministic=True, default_root_dir=tmp, **TRAINER_KW
    )
    trainer.fit(model, DataLoader(make_data(16, torch.float32), batch_size=4), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return model


def _equal_states(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_is_bit_exact_and_load_rebuilds_the_model(tmp_path: Path) -> None:
    def make() -> BlendedQuantWeights:
        return BlendedQuantWeights(bits=2, rho=0.01, rho_schedule=(2.0, 0.1))

    ckpt = tmp_path / "half.ckpt"
    _fit(tmp_path, 2, make(), save=ckpt)
    stored = torch.load(ckpt, weights_only=False)
    assert stored["lightning_ste"]["recipes"][0]["sites"] == ["fc1", "fc2"]
    assert stored["callbacks"]["BlendedQuantWeights"] == {"rho": 0.04, "epoch": 1}
    cb = make()
    resumed = _fit(tmp_path, 4, cb, ckpt=ckpt)
    straight = _fit(tmp_path, 4, make())
    _equal_states(resumed, straight)
    assert cb.rho == 0.1

    # The stored recipe rebuilds the quantized model without a Trainer, with identical outputs.
    fresh = Net()
    for recipe in stored["lightning_ste"]["recipes"]:
        apply_recipe(fresh, recipe)
    fresh.load_state_dict(stored["state_dict"], strict=True)
    half = _fit(tmp_path, 2, make())
    x = make_data(8, torch.float32).tensors[0]
    fresh.eval(), half.eval()
    assert torch.equal(fresh(x), half(x))


def test_resume_follows_the_checkpoint_recipe(tmp_path: Path) -> None:
    ckpt = tmp_path / "fc1.ckpt"
    _fit(tmp_path, 1, BlendedQuantWeights(bits=2, include="fc1", rho=0.05), save=ckpt)
    # Different constructor arguments: the checkpoint's layers and bits decide.
    with pytest.warns(UserWarning, match="checkpoint"):
        resumed = _fit(tmp_path, 2, BlendedQuantWeights(bits=1, rho=0.05), ckpt=ckpt)
    assert [n for n, *_ in quantized_layers(resumed)] == ["fc1"]
    assert resumed.fc1.parametrizations.weight[0].bits == 2
    assert recipes_on(resumed)[0]["arguments"]["bits"] == 2
    straight = _fit(tmp_path, 2, BlendedQuantWeights(bits=2, include="fc1", rho=0.05))
    _equal_states(resumed, straight)


def test_float_checkpoint_evaluates_quantized_and_cannot_resume_fit(tmp_path: Path) -> None:
    ckpt = tmp_path / "float.ckpt"
    torch.manual_seed(0)
    float_model = Net(lr=0.05)
    data = DataLoader(make_data(16, torch.float32), batch_size=4)
    trainer = L.Trainer(max_epochs=1, default_root_dir=tmp_path, **TRAINER_KW)
    trainer.fit(float_model, data)
    trainer.save_checkpoint(ckpt)

    # validate(ckpt_path=float checkpoint): its weights become the latent W, evaluated quantized.
    model = Net()
    L.Trainer(callbacks=[BlendedQuantWeights()], **TRAINER_KW).validate(
        model, data, ckpt_path=ckpt, verbose=False
    )
    latent = model.fc1.parametrizations.weight.original.detach()
    assert torch.equal(latent, float_model.fc1.weight.detach())
    torch.testing.assert_close(model.fc1.weight.detach(), quantize(latent, 1))

    t2 = L.Trainer(max_epochs=2, callbacks=[BlendedQuantWeights()], default_root_dir=tmp_path, **TRAINER_KW)
    with pytest.raises(ValueError, match="float weights.*load_state_dict"):
        t2.fit(Net(lr=0.05), data, ckpt_path=ckpt)


# ---------------------------------------------------------------------------------------------- DDP


class RankDump(L.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        latents = {n: w.detach().clone() for n, _, w, _ in quantized_layers(pl_module)}
        torch.save(latents, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def test_ddp_two_processes_keep_identical_latent_weights(tmp_path: Path) -> None:
    kw = {**TRAINER_KW, "accelerator": "cpu"}
    trainer = L.Trainer(
        max_steps=4,
        devices=2,
        strategy="ddp_spawn",
        callbacks=[BlendedQuantWeights(rho=0.1), RankDump(str(tmp_path))],
        **kw,
    )
    trainer.fit(Net(lr=0.05), DataLoader(make_data(32, torch.float32), batch_size=4, shuffle=True))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert set(r0) == {"fc1", "fc2"}
    for k in r0:
        assert torch.equal(r0[k], r1[k])
    torch.manual_seed(0)
    assert not torch.equal(r0["fc1"], Net().fc1.weight.detach())  # they trained


# ------------------------------------------------------------------------------ with QuantizeActivations


@pytest.mark.parametrize("weights_first", [True, False])
def test_with_quantize_activations_and_load_from_checkpoint(tmp_path: Path, weights_first: bool) -> None:
    from lightning_ste import QuantizeActivations, QuantReLU, load_from_checkpoint

    callbacks = [BlendedQuantWeights(bits=2, rho=0.05), QuantizeActivations(bits=2)]
    model = Net(lr=0.05)
    trainer = L.Trainer(max_steps=3, callbacks=callbacks if weights_first else callbacks[::-1], **TRAINER_KW)
    trainer.fit(model, DataLoader(make_data(16, torch.float32), batch_size=4))
    trainer.save_checkpoint(tmp_path / "both.ckpt")
    assert [n for n, *_ in quantized_layers(model)] == ["fc1", "fc2"]
    assert sorted(r["kind"] for r in recipes_on(model)) == ["activations", "weights"]
    assert any(isinstance(m, QuantReLU) for m in model.modules())
    loaded = load_from_checkpoint(Net, tmp_path / "both.ckpt")
    assert [n for n, *_ in quantized_layers(loaded)] == ["fc1", "fc2"]
    x = make_data(8, torch.float32).tensors[0]
    model.eval()
    assert torch.equal(loaded(x), model(x))
    assert loaded.fc2.parametrizations.weight[0].bits == 2
