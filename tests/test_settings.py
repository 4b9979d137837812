"""Every setting, end to end: one row per argument of QuantizeActivations, BlendedQuantWeights,
quantize_activations_ and quantize_weights_, each with a non-default value whose *effect* is checked against
an independent computation along every route the setting travels:

- ``function``: ``quantize_*_`` on a fresh model;
- ``callback``: a real ``Trainer.fit`` with the callback (the first optimizer step's alpha gradient and blend
  are checked as they happen);
- ``resume``: fresh model, fresh callback and fresh Trainer continuing the callback route's checkpoint;
- ``load``: ``lightning_ste.load_from_checkpoint`` of that checkpoint (the settings come from its recipe).

The expected settings are given by each row, never read back from the quantizer: a setting replaced by its
default anywhere on its way fails the row. Tiny models, in-memory data, one or two steps per fit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from alpha_oracle import AlphaProbe, check_alpha_record, expected_alpha_grad
from fixtures import quiet_trainer
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

import lightning_ste
from lightning_ste import BlendedQuantWeights, QuantizeActivations, QuantReLU

# --------------------------------------------------------------------------------------------- models


class ActNet(pl.LightningModule):
    """lin1 (frozen: a fixed projection) -> ReLU -> lin2 -> ReLU -> head; plain SGD on the rest."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1, self.act1 = nn.Linear(4, 6), nn.ReLU()
        self.lin2, self.act2 = nn.Linear(6, 6), nn.ReLU()
        self.head = nn.Linear(6, 3)
        self.lin1.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.act2(self.lin2(self.act1(self.lin1(x)))))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


class WeightNet(pl.LightningModule):
    """conv -> mid -> last in execution order, declared last, conv, mid (so declaration order is not it).

    Every weight tensor and every output channel has an odd number of entries: the median is one entry."""

    def __init__(self) -> None:
        super().__init__()
        self.last = nn.Linear(5, 3)
        self.conv = nn.Conv1d(1, 1, 3)
        self.mid = nn.Linear(3, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x.unsqueeze(1)).flatten(1)
        return self.last(torch.relu(self.mid(h)))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


WEIGHT_LAYERS = ("conv", "mid", "last")
LR = 0.1


def act_data() -> DataLoader:
    """Two batches of 16; the second one's inputs three times larger (so its max|x| is the larger one)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g)
    x[16:] *= 3
    return DataLoader(TensorDataset(x, torch.randint(0, 3, (32,), generator=g)), batch_size=16)


def weight_data() -> DataLoader:
    """One batch per epoch, so the second step of a run is the first of epoch 1."""
    g = torch.Generator().manual_seed(2)
    return DataLoader(
        TensorDataset(torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)), batch_size=16
    )


def fit(
    model: pl.LightningModule,
    callbacks: list[pl.Callback],
    data: DataLoader,
    ckpt: Path | None = None,
    **kwargs: Any,
) -> pl.Trainer:
    """A real Trainer on CPU, nothing written but what the test saves; resumes from ``ckpt`` when given."""
    trainer = quiet_trainer(devices=1, num_sanity_val_steps=0, callbacks=callbacks, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_workers hints
        trainer.fit(model, data, ckpt_path=ckpt)
    return trainer


# ------------------------------------------------------------------------------- activation oracle


def ref_sigma(x: Tensor, alpha: float, bits: int, rounding: str) -> Tensor:
    """alpha * clamp(ceil(x / alpha), 0, L) (ceil) or alpha * clamp(round(x / alpha), 0, L) (nearest)."""
    k = torch.ceil(x / alpha) if rounding == "ceil" else torch.round(x / alpha)
    return alpha * k.clamp(0, 2**bits - 1)


def ref_ste(x: Tensor, top: float, ste: str) -> Tensor:
    """The STE multiplier: 1; 1{x > 0}; 1{0 < x <= L alpha}; 1 on (0, L alpha] and 1/(x - L alpha + 1) above."""
    pos = (x > 0).double()
    return {
        "identity": torch.ones_like(x),
        "relu": pos,
        "clipped_relu": pos * (x <= top).double(),
        "log_tailed_relu": torch.where(x <= top, pos, 1 / (x - top + 1)),
    }[ste]


ACT_DEFAULTS: dict[str, Any] = dict(
    bits=4, ste="clipped_relu", mode="learned", alpha=None, alpha_grad="mean", r=0.01, rounding="ceil"
)
PUBLISHED = {1: 1.2221, 2: 0.6511, 3: 0.3534, 4: 0.1946}  # half-Gaussian MSE-optimal steps


def check_site(q: nn.Module, s: dict[str, Any], alpha: float | None = None) -> None:
    """``q`` is a QuantReLU with settings ``s``: forward levels, the STE, alpha's kind, alpha's gradient."""
    assert isinstance(q, QuantReLU), type(q)
    learned = s["mode"] == "learned"
    assert isinstance(q.alpha, nn.Parameter) == learned
    a = float(q.alpha.detach())
    if alpha is not None:
        assert a == pytest.approx(alpha, rel=1e-6, abs=1e-4), (a, alpha)  # published values: 4 digits
    levels = 2 ** s["bits"] - 1
    # Inputs away from every level boundary (k alpha and (k + 1/2) alpha), below 0 to above the top level.
    k = torch.arange(-2, levels + 3, dtype=torch.float64)[:, None]
    x = (a * (k + torch.tensor([0.13, 0.37, 0.62, 0.88], dtype=torch.float64))).flatten().float()
    x.requires_grad_(True)
    dy = 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    was_training = q.training
    q.eval()  # no calibration step here
    if learned:
        q.alpha.grad = None
    y = q(x)
    (y * dy).sum().backward()
    q.train(was_training)
    xd = x.detach().double()
    assert torch.allclose(y.detach().double(), ref_sigma(xd, a, s["bits"], s["rounding"]), atol=1e-5)
    assert torch.allclose(x.grad.double(), dy.double() * ref_ste(xd, levels * a, s["ste"]), atol=1e-7)
    if learned:
        expected = expected_alpha_grad(
            [(x.detach(), dy)], a, s["bits"], s["alpha_grad"], s["r"], s["rounding"]
        )
        assert abs(expected) < 1, "the proxy sum is clamped: the check would not see alpha_lr_scale"
        assert float(q.alpha.grad) == pytest.approx(expected, rel=1e-4, abs=1e-9)
    else:
        assert not q.alpha.requires_grad


class SiteInputs(pl.Callback):
    """The inputs every QuantReLU saw in training forwards (for calibration)."""

    def __init__(self) -> None:
        self.inputs: dict[str, list[Tensor]] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, q in pl_module.named_modules():
            if isinstance(q, QuantReLU):
                self.inputs[name] = []
                q.register_forward_pre_hook(
                    lambda q, i, name=name: (
                        self.inputs[name].append(i[0].detach().clone()) if q.training else None
                    )
                )


@dataclass
class ActRow:
    """One activation setting: the arguments, the sites it converts and their settings."""

    id: str
    kwargs: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    sites: tuple[str, ...] = ("act1", "act2")

    def expected(self) -> dict[str, Any]:
        return {**ACT_DEFAULTS, **self.settings}


ACT_ROWS = [
    ActRow("bits", {"bits": 3}, {"bits": 3}),
    ActRow("ste", {"ste": "log_tailed_relu"}, {"ste": "log_tailed_relu"}),
    ActRow("alpha-number", {"alpha": 0.3}, {"mode": "fixed", "alpha": 0.3}),
    ActRow("alpha-fixed", {"alpha": "fixed", "bits": 2}, {"mode": "fixed", "alpha": PUBLISHED[2], "bits": 2}),
    ActRow("alpha-calibrate", {"alpha": "calibrate"}, {"mode": "calibrate", "batches": 1}),
    ActRow("alpha_grad", {"alpha_grad": "ae"}, {"alpha_grad": "ae"}),
    ActRow("alpha_lr_scale", {"alpha_lr_scale": 0.5}, {"r": 0.5}),
    ActRow("rounding", {"rounding": "nearest"}, {"rounding": "nearest"}),
    ActRow("include", {"include": "act2"}, sites=("act2",)),
    ActRow("exclude", {"exclude": ["act2"]}, sites=("act1",)),
    ActRow(
        "calibration_batches",
        {"alpha": "calibrate", "calibration_batches": 2},
        {"mode": "calibrate", "batches": 2},
    ),
    ActRow("dry_run", {"dry_run": True}, sites=()),
]


def check_act_model(model: nn.Module, row: ActRow, alphas: dict[str, float] | None = None) -> None:
    """The converted sites are exactly the row's, each with the row's settings; the others float ReLUs."""
    s = row.expected()
    for name in ("act1", "act2"):
        site = model.get_submodule(name)
        if name not in row.sites:
            assert type(site) is nn.ReLU, (name, type(site))
            continue
        alpha = s["alpha"] if s["alpha"] is not None else (alphas or {}).get(name)
        check_site(site, s, alpha)


def calibrated_alphas(inputs: dict[str, list[Tensor]], bits: int, batches: int) -> dict[str, float]:
    """alpha = max|x| / L over the first ``batches`` training batches each site saw."""
    levels = 2**bits - 1
    return {n: max(float(x.abs().max()) for x in xs[:batches]) / levels for n, xs in inputs.items()}


@pytest.mark.parametrize("row", ACT_ROWS, ids=lambda r: r.id)
def test_activation_setting_on_every_route(row: ActRow, tmp_path: Path) -> None:
    s = row.expected()
    data = act_data()
    batches = [b[0] for b in data]

    # function: quantize_activations_ on a plain copy of the model
    pl.seed_everything(0)
    model = ActNet()
    sites = lightning_ste.quantize_activations_(model, **row.kwargs)
    planned = ("act1", "act2") if row.kwargs.get("dry_run") else row.sites  # a dry run returns the plan
    assert sorted(sites) == sorted(planned)
    init = {n: PUBLISHED[s["bits"]] for n in row.sites} if s["mode"] == "learned" else {}
    check_act_model(model, row, init)
    if s["mode"] == "calibrate":  # training forwards set alpha = max|x| / L over the first `batches` batches
        q = model.act1
        h = [model.lin1(b) for b in batches] + [model.lin1(batches[1]) * 10]
        for inp in h:
            q.train()(inp)
        top = max(float(t.abs().max()) for t in h[: s["batches"]])
        assert float(q.alpha) == pytest.approx(top / (2 ** s["bits"] - 1), rel=1e-6)

    # callback: two training steps; the first one's alpha gradient and SGD step against the oracle
    pl.seed_everything(0)
    model = ActNet()
    probe = AlphaProbe(s["bits"], s["alpha_grad"], s["r"], s["rounding"], sites=list(row.sites))
    record = SiteInputs()
    callbacks = [QuantizeActivations(**row.kwargs), record]
    if s["mode"] == "learned" and row.sites:
        callbacks.append(probe)
    trainer = fit(model, callbacks, data, max_steps=2)
    if s["mode"] == "learned" and row.sites:
        assert all(
            r["alpha"] == pytest.approx(PUBLISHED[s["bits"]], rel=1e-6, abs=1e-4)
            for r in probe.record.values()
        )
        check_alpha_record(probe.record)
    expected_alphas = {n: float(model.get_submodule(n).alpha) for n in row.sites}
    if s["mode"] == "calibrate":
        expected_alphas = calibrated_alphas(record.inputs, s["bits"], s["batches"])
        assert expected_alphas["act1"] == pytest.approx(
            max(float(model.lin1(b).abs().max()) for b in batches[: s["batches"]]) / 15, rel=1e-6
        )
    check_act_model(model, row, expected_alphas)
    ckpt = tmp_path / "callback.ckpt"
    trainer.save_checkpoint(ckpt)
    stored = torch.load(ckpt, weights_only=False).get("lightning_ste", {}).get("recipes", [])
    assert [r["sites"] for r in stored] == ([list(row.sites)] if row.sites else [])

    # resume: fresh objects continue to step 3 (calibration is not redone: its count was restored)
    pl.seed_everything(5)
    resumed = ActNet()
    fit(resumed, [QuantizeActivations(**row.kwargs)], data, ckpt, max_steps=3)
    alphas = {n: float(resumed.get_submodule(n).alpha) for n in row.sites}
    if s["mode"] == "learned":
        assert all(alphas[n] != expected_alphas[n] for n in row.sites)  # the third step moved them
    else:
        assert alphas == pytest.approx(expected_alphas, rel=1e-6)
    check_act_model(resumed, row, alphas)

    # load: the recipe rebuilds the quantizers on a fresh model, with the same outputs
    loaded = lightning_ste.load_from_checkpoint(ActNet, ckpt)
    check_act_model(loaded, row, expected_alphas)
    with torch.no_grad():
        assert torch.equal(loaded(batches[0]), model.eval()(batches[0]))


class Relu6Net(ActNet):
    """ActNet whose first activation is a ReLU6."""

    def __init__(self) -> None:
        super().__init__()
        self.act1 = nn.ReLU6()


def check_relu6_model(model: nn.Module) -> None:
    """act1 (ReLU6) is the 2-bit staircase capped at 6: alpha = 6 / L = 2, fixed; act2 a learned 2-bit site."""
    check_site(model.act1, {**ACT_DEFAULTS, "bits": 2, "mode": "fixed"}, alpha=6 / 3)
    check_site(model.act2, {**ACT_DEFAULTS, "bits": 2})


def test_targets_relu6_on_every_route(tmp_path: Path) -> None:
    """``targets=("relu", "relu6")`` converts a ReLU6 too; by default it stays float."""
    kwargs = {"bits": 2, "targets": ("relu", "relu6")}
    assert lightning_ste.quantize_activations_(Relu6Net(), bits=2) == ["act2"]
    model = Relu6Net()
    assert sorted(lightning_ste.quantize_activations_(model, **kwargs)) == ["act1", "act2"]
    check_relu6_model(model)

    data = act_data()
    pl.seed_everything(0)
    model = Relu6Net()
    trainer = fit(model, [QuantizeActivations(**kwargs)], data, max_steps=1)
    check_relu6_model(model)
    trainer.save_checkpoint(tmp_path / "relu6.ckpt")
    resumed = Relu6Net()
    fit(resumed, [QuantizeActivations(**kwargs)], data, tmp_path / "relu6.ckpt", max_steps=2)
    check_relu6_model(resumed)
    loaded = lightning_ste.load_from_checkpoint(Relu6Net, tmp_path / "relu6.ckpt")
    check_relu6_model(loaded)
    x = next(iter(data))[0]
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


# ---------------------------------------------------------------------------------- weight oracle


def ref_q(w: Tensor, bits: int, per_channel: bool, ternary_scale: str, binary_scale: str) -> Tensor:
    """q(W): binary delta sign(W), delta = mean|W| or median|W|; ternary TWN (threshold 0.7 mean|W|, scale
    sum of kept |W| over their count, or over all entries for "bcgd_code"); b-bit: delta = max|W| / (2^b - 1),
    code c = k on ((2k-1) delta, (2k+1) delta], capped at 2^(b-1) - 1, least-squares scale (BCGD19)."""
    w = w.detach().double()
    rows = w.reshape(w.shape[0], -1) if per_channel else w.reshape(1, -1)
    out = torch.empty_like(rows)
    for i, r in enumerate(rows):
        m = r.abs()
        if bits == 1:
            delta = m.mean() if binary_scale == "mean" else m.sort().values[(m.numel() - 1) // 2]
            out[i] = delta * torch.sign(r)
        elif bits == 2:
            keep = m >= 0.7 * m.mean()
            s = m[keep].sum() / (keep.sum() if ternary_scale == "twn" else m.numel())
            out[i] = s * torch.sign(r) * keep
        else:
            top = 2 ** (bits - 1) - 1
            delta = m.max() / (2**bits - 1)
            c = torch.zeros_like(m)
            for k in range(1, top + 1):
                c[m > (2 * k - 1) * delta] = k
            s = (m * c).sum() / (c * c).sum()
            out[i] = s * c * torch.sign(r)
    return out.reshape(w.shape)


W_DEFAULTS: dict[str, Any] = dict(bits=1, per_channel=False, ternary_scale="twn", binary_scale="mean")


@dataclass
class WeightRow:
    id: str
    kwargs: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    layers: tuple[str, ...] = WEIGHT_LAYERS
    rho: tuple[float, float] = (1e-5, 1e-5)  # the rho of epoch 0 and of epoch 1
    function: bool = True  # the argument exists in quantize_weights_

    def expected(self) -> dict[str, Any]:
        return {**W_DEFAULTS, **self.settings}


WEIGHT_ROWS = [
    WeightRow("bits-ternary", {"bits": 2}, {"bits": 2}),
    WeightRow("bits-4", {"bits": 4}, {"bits": 4}),
    WeightRow("per_channel", {"per_channel": True}, {"per_channel": True}),
    WeightRow(
        "ternary_scale", {"bits": 2, "ternary_scale": "bcgd_code"}, {"bits": 2, "ternary_scale": "bcgd_code"}
    ),
    WeightRow("binary_scale", {"binary_scale": "median"}, {"binary_scale": "median"}),
    WeightRow("layer_types", {"layer_types": [nn.Linear]}, layers=("mid", "last")),
    WeightRow("include", {"include": "m*"}, layers=("mid",)),
    WeightRow("exclude", {"exclude": ["conv", "last"]}, layers=("mid",)),
    WeightRow("keep_first_last", {"keep_first_last": True}, layers=("mid",)),
    WeightRow("rho", {"rho": 0.5}, rho=(0.5, 0.5), function=False),
    WeightRow("rho_schedule-pair", {"rho": 0.1, "rho_schedule": (2.0, 0.3)}, rho=(0.2, 0.3), function=False),
    WeightRow(
        "rho_schedule-callable",
        {"rho_schedule": lambda epoch: 0.25 * (epoch + 1)},
        rho=(0.25, 0.5),
        function=False,
    ),
    WeightRow("dry_run", {"dry_run": True}, layers=()),
]


def check_weight_model(model: nn.Module, row: WeightRow) -> None:
    """Exactly the row's layers are parametrized, each with weight = q(latent) under the row's settings."""
    s = row.expected()
    for name in WEIGHT_LAYERS:
        layer = model.get_submodule(name)
        assert parametrize.is_parametrized(layer, "weight") == (name in row.layers), name
        if name in row.layers:
            latent = layer.parametrizations.weight.original
            expected = ref_q(latent, s["bits"], s["per_channel"], s["ternary_scale"], s["binary_scale"])
            assert torch.allclose(layer.weight.detach().double(), expected, rtol=1e-5, atol=1e-7), name


class BlendRecorder(pl.Callback):
    """Latent weights and their gradients before the step (listed before BlendedQuantWeights), and after it."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[Tensor, Tensor, Tensor | None]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = {}
        for name in WEIGHT_LAYERS:
            layer = pl_module.get_submodule(name)
            if parametrize.is_parametrized(layer, "weight"):
                latent = layer.parametrizations.weight.original
                step[name] = (latent.detach().clone(), latent.grad.detach().clone(), None)
        self.steps.append(step)

    def on_train_batch_end(self, trainer, pl_module, *args: Any) -> None:
        self.steps[-1] = {
            n: (w, g, pl_module.get_submodule(n).parametrizations.weight.original.detach().clone())
            for n, (w, g, _) in self.steps[-1].items()
        }


def check_blend(step: dict[str, tuple[Tensor, Tensor, Tensor | None]], row: WeightRow, rho: float) -> None:
    """W+ = (1 - rho) W + rho q(W) - lr g (plain SGD), for every quantized layer."""
    s = row.expected()
    assert sorted(step) == sorted(row.layers)
    for name, (w, g, after) in step.items():
        q = ref_q(w, s["bits"], s["per_channel"], s["ternary_scale"], s["binary_scale"])
        expected = (1 - rho) * w.double() + rho * q - LR * g.double()
        assert after is not None and torch.allclose(after.double(), expected, rtol=1e-5, atol=1e-7), name
        # and rho is visible: the blend moved W by rho (q(W) - W), more than rounding
        if rho >= 0.1:
            assert not torch.allclose(after.double(), w.double() - LR * g.double(), atol=1e-4), name


@pytest.mark.parametrize("row", WEIGHT_ROWS, ids=lambda r: r.id)
def test_weight_setting_on_every_route(row: WeightRow, tmp_path: Path) -> None:
    data = weight_data()
    x = next(iter(data))[0]
    fn_kwargs = {k: v for k, v in row.kwargs.items() if k not in ("rho", "rho_schedule")}

    # function: quantize_weights_ (keep_first_last finds the execution order with a probe forward)
    if row.function:
        pl.seed_everything(0)
        model = WeightNet()
        extra = {"example_input": x} if row.kwargs.get("keep_first_last") else {}
        names = lightning_ste.quantize_weights_(model, **fn_kwargs, **extra)
        planned = WEIGHT_LAYERS if row.kwargs.get("dry_run") else row.layers  # a dry run returns the plan
        assert sorted(names) == sorted(planned)
        check_weight_model(model, row)

    # callback: one step in epoch 0, blended with that epoch's rho
    pl.seed_everything(0)
    model, recorder = WeightNet(), BlendRecorder()
    trainer = fit(model, [recorder, BlendedQuantWeights(**row.kwargs)], data, max_epochs=1)
    check_weight_model(model, row)
    assert len(recorder.steps) == 1
    if row.layers:
        check_blend(recorder.steps[0], row, row.rho[0])
    ckpt = tmp_path / "callback.ckpt"
    trainer.save_checkpoint(ckpt)

    # resume: fresh objects run the step of epoch 1, with epoch 1's rho
    pl.seed_everything(5)
    resumed, recorder = WeightNet(), BlendRecorder()
    fit(resumed, [recorder, BlendedQuantWeights(**row.kwargs)], data, ckpt, max_epochs=2)
    check_weight_model(resumed, row)
    assert len(recorder.steps) == 1
    if row.layers:
        check_blend(recorder.steps[0], row, row.rho[1])
        for name in row.layers:  # it started from the checkpoint's latent weights
            start = recorder.steps[0][name][0]
            assert torch.equal(start, model.get_submodule(name).parametrizations.weight.original.detach())

    # load: the stored recipe rebuilds the quantizers with the row's settings
    loaded = lightning_ste.load_from_checkpoint(WeightNet, ckpt)
    check_weight_model(loaded, row)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_the_table_covers_every_argument() -> None:
    """Each argument of the two callbacks and the two functions has a row (dry_run and targets included);
    a function taking a config (or its fields as keywords) has a row for each field of that config."""
    import dataclasses
    import inspect

    from lightning_ste.config import ActivationQuantConfig, WeightQuantConfig

    covered_act = {k for r in ACT_ROWS for k in r.kwargs} | {"targets"}
    covered_w = {k for r in WEIGHT_ROWS for k in r.kwargs} | {"example_input"}
    for fn, covered, config in (
        (QuantizeActivations.__init__, covered_act, ActivationQuantConfig),
        (lightning_ste.quantize_activations_, covered_act, ActivationQuantConfig),
        (BlendedQuantWeights.__init__, covered_w, WeightQuantConfig),
        (lightning_ste.quantize_weights_, covered_w, WeightQuantConfig),
    ):
        params = set(inspect.signature(fn).parameters) - {"self", "module"}
        if {"config", "kwargs"} <= params:
            params = params - {"config", "kwargs"} | {f.name for f in dataclasses.fields(config)}
        assert params <= covered, (fn.__qualname__, params - covered)
