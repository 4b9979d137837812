"""QuantizeActivations in a real lightning.Trainer on a real MNIST subset."""

from __future__ import annotations

import logging
import warnings
from functools import cache
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from alpha_oracle import AlphaProbe, check_alpha_record
from fixtures import quiet_trainer
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.utilities.compile import to_uncompiled
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST

import lightning_ste
from lightning_ste import QuantizeActivations, QuantReLU
from lightning_ste.recipe import recipes_on

# ------------------------------------------------------------------------------------------------- data


@cache
def _mnist(root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    data = MNIST(root, train=train, download=False)
    images = (data.data[:2048].float().div(255).sub(0.1307).div(0.3081)).unsqueeze(1)
    return images, data.targets[:2048]


def loader(root: Path, n: int, batch_size: int = 64, train: bool = True, offset: int = 0) -> DataLoader:
    x, y = _mnist(str(root), train)
    return DataLoader(TensorDataset(x[offset : offset + n], y[offset : offset + n]), batch_size=batch_size)


def make_trainer(**kwargs) -> pl.Trainer:
    return quiet_trainer(**{**dict(devices=1, num_sanity_val_steps=0, max_epochs=1), **kwargs})


# ------------------------------------------------------------------------------------------------ model


class Body(nn.Module):
    """The functional spellings: F.relu, Tensor.relu, torch.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2)  # 13x13
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2)  # 6x6
        self.fc1 = nn.Linear(16 * 36, 32)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = self.conv2(x).relu()
        return torch.relu(self.fc1(x.flatten(1)))


class MixedNet(pl.LightningModule):
    """Every ReLU form: module, in-place module, shared module (2 calls), F.relu / Tensor.relu / torch.relu
    in a submodule, Tensor.relu_ and F.relu(inplace=True) in the LightningModule's own forward."""

    def __init__(self, lr: float = 0.01, optimizer_params: str = "all") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = Body()
        self.act = nn.ReLU()
        self.act_inplace = nn.ReLU(inplace=True)
        self.shared = nn.ReLU()
        self.fc2, self.fc3 = nn.Linear(32, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        h = self.act_inplace(self.fc2(self.body(x)))
        h = self.shared(h) + self.shared(self.fc3(h))
        h.relu_()
        return self.head(self.act(F.relu(h - 0.05, inplace=True)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        if self.hparams.optimizer_params == "weights":  # listed by hand: no alpha in it
            params = [
                p for m in self.modules() if isinstance(m, (nn.Linear, nn.Conv2d)) for p in m.parameters()
            ]
        else:
            params = self.parameters()
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=1e-4)


MIXED_SITES = [
    "act",
    "act_inplace",
    "shared",
    "shared_1",
    "relu_fx_0",
    "relu_fx_1",
    "body.relu_fx_0",
    "body.relu_fx_1",
    "body.relu_fx_2",
]


class CountReLUCalls(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)
        return func(*args, **(kwargs or {}))


def quantizers(model: nn.Module) -> dict[str, QuantReLU]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantReLU)}


def alphas(model: nn.Module) -> dict[str, float]:
    return {n: float(q.alpha.detach()) for n, q in quantizers(model).items()}


def outputs_on_grid(model: nn.Module, x: torch.Tensor, tol: float = 1e-4) -> bool:
    """Run ``model`` on ``x`` and check every QuantReLU output is k * alpha, k in 0..L."""
    seen: list[bool] = []

    def hook(q, inputs, y) -> None:
        k = y.detach().double() / q.alpha.detach().double()
        seen.append(
            bool(((k - k.round()).abs() < tol).all() and k.min() >= 0 and k.round().max() <= q.levels)
        )

    handles = [q.register_forward_hook(hook) for q in quantizers(model).values()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return len(seen) == len(quantizers(model)) and all(seen)


def check_reload(trainer: pl.Trainer, model: nn.Module, path: Path, mnist_root: Path) -> None:
    """Save the trainer's checkpoint to ``path``: the MixedNet rebuilt from it gives ``model``'s outputs on 64
    test images, all on the quantization grid."""
    trainer.save_checkpoint(path)
    loaded = lightning_ste.load_from_checkpoint(MixedNet, path)
    x, _ = next(iter(loader(mnist_root, 64, 64, train=False)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    assert outputs_on_grid(loaded, x)


# ------------------------------------------------------------------------------------------------ tests


def test_all_relu_forms_train_on_mnist_and_lie_on_the_grid(mnist_root):
    pl.seed_everything(0)
    model, callback, probe = MixedNet(), QuantizeActivations(bits=2), AlphaProbe(bits=2)
    trainer = make_trainer(callbacks=[callback, probe], limit_train_batches=24)
    trainer.fit(model, loader(mnist_root, 1536), loader(mnist_root, 512, 256, train=False))
    assert callback.sites == MIXED_SITES
    assert sorted(quantizers(model)) == sorted(MIXED_SITES)
    # Every learned alpha got the BCGD19 'mean' proxy gradient (r = 0.01) of its own inputs on step 1 and
    # moved by Adam's first step (lr 0.01, weight decay 1e-4), from the published 0.6511.
    assert sorted(probe.record) == sorted(MIXED_SITES)
    assert all(r["alpha"] == pytest.approx(0.6511, abs=1e-6) for r in probe.record.values())
    check_alpha_record(probe.record)
    x, y = next(iter(loader(mnist_root, 512, 512, train=False)))
    model.eval()
    counter = CountReLUCalls()
    with counter:
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert counter.calls == 0  # no float ReLU runs
    assert outputs_on_grid(model, x)
    assert accuracy > 0.4, accuracy  # 2-bit activations learn MNIST (chance: 0.1)


def _run(mnist_root, max_epochs, ckpt_path=None, save=None, **trainer_kwargs):
    pl.seed_everything(1)
    model = MixedNet(optimizer_params="weights")
    trainer = make_trainer(
        callbacks=[QuantizeActivations(bits=3)],
        max_epochs=max_epochs,
        limit_train_batches=3,
        deterministic=True,
        **trainer_kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, loader(mnist_root, 192, 64), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return model, trainer


def test_resume_with_fresh_objects_is_bit_exact(mnist_root, tmp_path):
    full, _ = _run(mnist_root, max_epochs=2)
    _run(mnist_root, max_epochs=1, save=tmp_path / "half.ckpt")
    resumed, trainer = _run(mnist_root, max_epochs=2, ckpt_path=tmp_path / "half.ckpt")
    assert trainer.global_step == 6
    assert len(trainer.optimizers[0].param_groups) == 2  # the alpha group, restored with its momentum
    a, b = full.state_dict(), resumed.state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_load_from_checkpoint_gives_identical_outputs(mnist_root, tmp_path):
    model, _ = _run(mnist_root, max_epochs=1, save=tmp_path / "m.ckpt")
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=False)
    (recipe,) = checkpoint["lightning_ste"]["recipes"]
    assert recipe["kind"] == "activations" and recipe["sites"] == MIXED_SITES
    loaded = lightning_ste.load_from_checkpoint(MixedNet, tmp_path / "m.ckpt", lr=0.5)
    assert not loaded.training and loaded.hparams.lr == 0.5 and loaded.hparams.optimizer_params == "weights"
    x, _ = next(iter(loader(mnist_root, 128, 128, train=False)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


class SaveAlphas(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save(alphas(pl_module), self.folder / f"rank{trainer.global_rank}.pt")


BODY = ["body.relu_fx_0", "body.relu_fx_1", "body.relu_fx_2"]


def test_ddp_two_processes_keep_alpha_identical(mnist_root, tmp_path):
    pl.seed_everything(0)
    learned = QuantizeActivations(bits=2, include="body.*")
    # one step: only the callback's all-gather (not DDP's buffer broadcast, which comes at the next forward)
    # makes the ranks' calibrated alphas agree, on the max over the global batch
    calibrated = QuantizeActivations(bits=4, alpha="calibrate")
    trainer = make_trainer(
        strategy="ddp_spawn",
        devices=2,
        callbacks=[
            learned,
            calibrated,
            SaveAlphas(tmp_path),
            AlphaProbe(bits=2, sites=BODY, folder=tmp_path),
        ],
        limit_train_batches=1,
    )
    trainer.fit(MixedNet(), loader(mnist_root, 512, 32))
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert sorted(rank0) == sorted(MIXED_SITES)
    assert rank0 == rank1
    # learned: alpha.grad is the mean over the ranks of the proxy gradient, and Adam stepped it (lr 0.01)
    for rank in (0, 1):
        check_alpha_record(torch.load(tmp_path / f"alpha_probe_rank{rank}.pt"))
    assert all(abs(rank0[n] - 0.1946) > 1e-6 for n in MIXED_SITES if not n.startswith("body."))  # calibrated


def test_bf16_mixed_on_cpu(mnist_root):
    pl.seed_everything(0)
    model, probe = MixedNet(), AlphaProbe(bits=2)
    seen: list[torch.dtype] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                pl_module.act.register_forward_hook(lambda q, i, y: seen.append(y.dtype) or None)

    trainer = make_trainer(
        callbacks=[QuantizeActivations(bits=2), Watch(), probe], precision="bf16-mixed", limit_train_batches=4
    )
    trainer.fit(model, loader(mnist_root, 256, 64))
    assert seen and seen[0] == torch.bfloat16  # the quantizer ran on bf16 activations
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # alpha.grad is the proxy gradient of the bf16 inputs and output gradients (summed in float32 or better)
    check_alpha_record(probe.record, rel=1e-2)
    x, _ = next(iter(loader(mnist_root, 64, 64, train=False)))
    assert outputs_on_grid(model.eval(), x)


def test_gradient_accumulation_matches_the_large_batch(mnist_root):
    """Two micro-batches of 32 step like one batch of 64; calibration counts micro-batches."""

    def run(batch_size, accumulate, alpha, calibration_batches=1):
        pl.seed_everything(0)
        model = MixedNet()
        callback = QuantizeActivations(bits=2, alpha=alpha, calibration_batches=calibration_batches)
        trainer = make_trainer(
            callbacks=[callback], accumulate_grad_batches=accumulate, limit_train_batches=2 * accumulate
        )
        trainer.fit(model, loader(mnist_root, 128, batch_size))
        assert trainer.global_step == 2
        return model

    small, large = run(32, 2, alpha=0.5), run(64, 1, alpha=0.5)
    sa, sb = small.state_dict(), large.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-5) for k in sa if torch.is_tensor(sa[k]))
    assert not torch.allclose(sa["head.weight"], MixedNet().head.weight, atol=1e-3)  # it did train

    small, large = run(32, 2, alpha="calibrate", calibration_batches=2), run(64, 1, alpha="calibrate")
    assert all(q.calibrated_batches == 2 for q in quantizers(small).values())
    # The first quantizer sees the same pre-activations either way: max over the same 64 images.
    assert float(small.body.relu_fx_0.alpha) == pytest.approx(float(large.body.relu_fx_0.alpha), rel=1e-6)


def test_torch_compile(mnist_root):
    pl.seed_everything(0)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = MixedNet()
    callback = QuantizeActivations(bits=2)
    trainer = make_trainer(callbacks=[callback], limit_train_batches=2)
    # aot_eager: dynamo + AOTAutograd without inductor's C++ build, which is slow on a shared CPU
    trainer.fit(torch.compile(model, backend="aot_eager"), loader(mnist_root, 128, 64))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert callback.sites == MIXED_SITES
    # The compiled training moved every alpha as the eager one does (whose gradient the probe tests check).
    pl.seed_everything(0)
    eager = MixedNet()
    make_trainer(callbacks=[QuantizeActivations(bits=2)], limit_train_batches=2).fit(
        eager, loader(mnist_root, 128, 64)
    )
    assert alphas(model) == pytest.approx(alphas(eager), rel=1e-5, abs=1e-7)
    assert all(abs(a - 0.6511) > 5e-3 for a in alphas(model).values())  # two Adam steps of lr 0.01
    # Lightning's to_uncompiled restores `original_forward`: the rewritten forward, not the float one.
    to_uncompiled(model)
    x, _ = next(iter(loader(mnist_root, 64, 64, train=False)))
    model.eval()
    counter = CountReLUCalls()
    with counter, torch.no_grad():
        model(x)
    assert counter.calls == 0
    assert outputs_on_grid(model, x)


@pytest.mark.parametrize("pruning_first", [True, False])
def test_together_with_model_pruning(mnist_root, tmp_path, pruning_first):
    pl.seed_everything(0)
    model = MixedNet()
    pruning = ModelPruning("l1_unstructured", amount=0.5, verbose=0)
    quant = QuantizeActivations(bits=2)
    trainer = make_trainer(
        callbacks=[pruning, quant] if pruning_first else [quant, pruning], limit_train_batches=3
    )
    trainer.fit(model, loader(mnist_root, 192, 64))
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.01)  # global L1 pruning of half the weights
    assert sorted(quantizers(model)) == sorted(MIXED_SITES)
    check_reload(trainer, model, tmp_path / "p.ckpt", mnist_root)


def test_calibrate_uses_the_first_training_batch_and_validation_never_changes_alpha(mnist_root):
    pl.seed_everything(0)
    model = MixedNet()
    first_train_input: dict[str, torch.Tensor] = {}

    class Record(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            for name, q in quantizers(pl_module).items():

                def hook(q, inputs, name=name):
                    if q.training and name not in first_train_input:
                        first_train_input[name] = inputs[0].detach().clone()

                q.register_forward_pre_hook(hook)

    trainer = make_trainer(
        callbacks=[QuantizeActivations(bits=2, alpha="calibrate"), Record()],
        limit_train_batches=3,
        limit_val_batches=1,
        num_sanity_val_steps=1,  # validation before the first training batch must not calibrate
    )
    val = loader(mnist_root, 64, 64, train=False)
    trainer.fit(model, loader(mnist_root, 192, 64), val)
    calibrated = alphas(model)
    assert sorted(first_train_input) == sorted(MIXED_SITES)
    for name, x in first_train_input.items():
        assert calibrated[name] == pytest.approx(float(x.abs().amax() / 3), rel=1e-6), name
        assert quantizers(model)[name].calibrated_batches == 1
    trainer.validate(model, val, verbose=False)
    trainer.predict(model, loader(mnist_root, 64, 64, train=False))
    assert alphas(model) == calibrated
    assert all(not isinstance(q.alpha, nn.Parameter) for q in quantizers(model).values())


def test_learned_alpha_is_added_to_a_hand_written_optimizer_once(mnist_root):
    pl.seed_everything(0)
    model, callback = MixedNet(optimizer_params="weights"), QuantizeActivations(bits=2)
    probe = AlphaProbe(bits=2)
    with pytest.warns(UserWarning, match=r"9 learned alpha\(s\) were in no optimizer param group") as record:
        trainer = make_trainer(callbacks=[callback, probe], limit_train_batches=2)
        trainer.fit(model, loader(mnist_root, 128, 64))
    assert sum("in no optimizer param group" in str(w.message) for w in record) == 1
    first, added = trainer.optimizers[0].param_groups
    assert added["weight_decay"] == 0.0 and first["weight_decay"] == 1e-4
    assert {id(p) for p in added["params"]} == {id(q.alpha) for q in quantizers(model).values()}
    # The added group trains them: Adam's first step with lr 0.01 and no weight decay, on the proxy gradient.
    check_alpha_record(probe.record)

    # A second fit on the same objects: no second conversion, the group is added again, nothing said again.
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        trainer = make_trainer(callbacks=[callback], limit_train_batches=2)
        trainer.fit(model, loader(mnist_root, 128, 64))
    assert not any("in no optimizer param group" in str(w.message) for w in again)
    assert len(trainer.optimizers[0].param_groups) == 2
    assert len(recipes_on(model)) == 1 and sorted(quantizers(model)) == sorted(MIXED_SITES)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 9}, r"`bits` must be an int in 1..8, got 9"),
        ({"ste": "straight"}, r"unknown `ste` 'straight'; available: clipped_relu, identity"),
        ({"alpha": "max"}, r"allowed: 'learned', 'fixed', 'calibrate' or a number > 0"),
        ({"alpha": float("inf")}, r"finite number > 0"),
        ({"alpha_grad": "exact"}, r"allowed: ae, mean, min, pact"),
        ({"rounding": "up"}, r"allowed: ceil, nearest"),
        ({"calibration_batches": 1.5}, r"`calibration_batches` must be an int >= 1"),
        ({"exclude": [1]}, r"`exclude` must be None, a glob pattern or a list"),
        ({"dry_run": 1}, r"`dry_run` must be a bool"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizeActivations(**kwargs)


class NoReLU(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(torch.tanh(x.flatten(1)))

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("model_cls", "kwargs", "match"),
    [
        (
            MixedNet,
            {"include": ["body.*", "head*"]},
            r"`include` pattern\(s\) \['head\*'\] match no ReLU site",
        ),
        (MixedNet, {"exclude": ["*"]}, r"no ReLU site left after include=None exclude=\['\*'\]"),
        (NoReLU, {}, r"no ReLU found in NoReLU"),
    ],
)
def test_bad_selection_fails_at_setup_and_leaves_the_model_unchanged(mnist_root, model_cls, kwargs, match):
    model = model_cls()
    keys, text, x = list(model.state_dict()), repr(model), torch.randn(2, 1, 28, 28)
    y = model(x)
    trainer = make_trainer(callbacks=[QuantizeActivations(**kwargs)], limit_train_batches=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, loader(mnist_root, 64, 64))
    assert list(model.state_dict()) == keys and repr(model) == text and not quantizers(model)
    assert not recipes_on(model) and "forward" not in model.__dict__
    assert torch.equal(model(x), y)


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_dry_run_prints_the_plan_on_rank_zero_and_changes_nothing(mnist_root):
    model = MixedNet()
    keys = list(model.state_dict())
    handler, log = Lines(), logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    try:
        trainer = make_trainer(
            callbacks=[QuantizeActivations(bits=2, exclude="shared*", dry_run=True)], limit_train_batches=1
        )
        trainer.fit(model, loader(mnist_root, 64, 64))
    finally:
        log.removeHandler(handler)
    (plan,) = [line for line in handler.lines if "QuantizeActivations" in line]
    assert "would convert 7 ReLU call site(s)" in plan and "dry_run=True: the model was not changed" in plan
    assert "body.relu_fx_1" in plan and "Tensor.relu in body.forward" in plan
    assert "Left out by include=None exclude=['shared*'] (2): shared, shared_1" in plan
    assert list(model.state_dict()) == keys and not quantizers(model)


def test_plan_is_printed_when_converting(mnist_root):
    handler, log = Lines(), logging.getLogger("lightning.pytorch.utilities.rank_zero")
    log.addHandler(handler)
    try:
        make_trainer(callbacks=[QuantizeActivations(bits=4, alpha=0.3)], limit_train_batches=1).fit(
            MixedNet(), loader(mnist_root, 64, 64)
        )
    finally:
        log.removeHandler(handler)
    (plan,) = [line for line in handler.lines if "QuantizeActivations" in line]
    assert "converts 9 ReLU call site(s)" in plan
    assert "shared_1" in plan and "bits=4 ste=clipped_relu alpha=fixed 0.3" in plan


def test_callback_state_and_checkpoint_recipe(mnist_root, tmp_path):
    callback = QuantizeActivations(bits=3, include="body.*")
    model = MixedNet()
    trainer = make_trainer(callbacks=[callback], limit_train_batches=1)
    trainer.fit(model, loader(mnist_root, 64, 64))
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    checkpoint = torch.load(tmp_path / "c.ckpt", weights_only=False)
    state = checkpoint["callbacks"][callback.state_key]
    assert state["sites"] == ["body.relu_fx_0", "body.relu_fx_1", "body.relu_fx_2"]
    assert state["arguments"]["include"] == ["body.*"]
    assert checkpoint["lightning_ste"]["recipes"] == recipes_on(model)
    assert QuantizeActivations(bits=2).state_key != callback.state_key


@pytest.mark.parametrize("weights_first", [True, False])
def test_together_with_blended_quant_weights_in_either_order(mnist_root, tmp_path, weights_first):
    from lightning_ste import BlendedQuantWeights

    pl.seed_everything(0)
    model = MixedNet()
    weights, acts = BlendedQuantWeights(bits=1, rho=1e-4), QuantizeActivations(bits=2)
    trainer = make_trainer(
        callbacks=[weights, acts] if weights_first else [acts, weights], limit_train_batches=3
    )
    trainer.fit(model, loader(mnist_root, 192, 64))
    kinds = [r["kind"] for r in recipes_on(model)]
    assert kinds == (["weights", "activations"] if weights_first else ["activations", "weights"])
    assert sorted(quantizers(model)) == sorted(MIXED_SITES)
    assert torch.nn.utils.parametrize.is_parametrized(model.body.conv1)
    assert model.fc2.weight.unique().numel() <= 3  # binary weights: {-d, 0, d}
    check_reload(trainer, model, tmp_path / "wa.ckpt", mnist_root)
