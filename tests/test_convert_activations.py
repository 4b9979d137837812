"""quantize_activations_ on plain nn.Modules: finding every ReLU call site, naming, selection, recipes."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from lightning_ste import QuantReLU, quantize_activations_
from lightning_ste.recipe import recipes_on
from lightning_ste.surgery.activation_plan import apply_recipe, plan_activations

_RELU_CALLS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_}


class CountReLUCalls(TorchFunctionMode):
    """Counts every float ReLU that runs (nn.ReLU calls F.relu, so modules are counted too)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += func in _RELU_CALLS
        return func(*args, **(kwargs or {}))


class Inner(nn.Module):
    """Functional ReLUs of every spelling, including in-place ones whose side effect is read later."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        a = torch.relu(h - 0.1)
        b = (h - 0.2).relu()
        c = h - 0.3
        c.relu_()  # in place: `c` is read below
        d = F.relu(h - 0.4, inplace=True)
        e = torch.relu_(h - 0.5)
        return self.fc2(a + b + c + d + e)


class AllForms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()
        self.act = nn.ReLU()
        self.act_inplace = nn.ReLU(inplace=True)
        self.shared = nn.ReLU()
        self.seq = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.inner(x))
        x = self.act_inplace(x * 2)
        x = self.shared(x - 0.5) + self.shared(0.5 - x)
        return self.out(F.relu(self.seq(x)))


EXPECTED_SITES = [
    "act",
    "act_inplace",
    "shared",
    "shared_1",
    "seq.1",
    "relu_fx_0",
    *[f"inner.relu_fx_{i}" for i in range(6)],
]


def on_grid(y: torch.Tensor, q: QuantReLU) -> bool:
    k = y.detach().double() / q.alpha.detach().double().clamp_min(1e-3)
    return bool(
        ((k - k.round()).abs() < 1e-4).all() and (k.round() >= 0).all() and (k.round() <= q.levels).all()
    )


def test_every_relu_form_becomes_its_own_quantizer():
    model = AllForms()
    sites = quantize_activations_(model, bits=3)
    assert sites == EXPECTED_SITES
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, QuantReLU)}
    assert sorted(quantizers) == sorted(EXPECTED_SITES)
    assert len({id(q) for q in quantizers.values()}) == len(EXPECTED_SITES)
    assert not any(type(m) is nn.ReLU for m in model.modules())

    calls: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, inputs, output) -> None:
            calls[name] = calls.get(name, 0) + 1
            outputs[name] = output

        return hook

    for name, q in quantizers.items():
        q.register_forward_hook(record(name))
    counter = CountReLUCalls()
    with counter:
        model(torch.randn(16, 6))
    assert counter.calls == 0  # no float ReLU runs anymore
    assert calls == dict.fromkeys(EXPECTED_SITES, 1)  # each site runs once per forward
    assert all(on_grid(outputs[n], quantizers[n]) for n in EXPECTED_SITES)
    assert model.inner.__class__ is Inner  # the module keeps its class; only its forward is rewritten


def test_in_place_relu_semantics_are_kept():
    """Later reads of a tensor changed by relu_ / inplace=True see the quantized values."""
    m, x = Inner(), torch.randn(32, 6)
    quantize_activations_(m, bits=2)
    q = [getattr(m, f"relu_fx_{i}") for i in range(6)]
    h = q[0](m.fc1(x))
    expected = m.fc2(q[1](h - 0.1) + q[2](h - 0.2) + q[3](h - 0.3) + q[4](h - 0.4) + q[5](h - 0.5))
    assert torch.equal(m(x), expected)
    assert not torch.equal(
        m(x), m.fc2(q[1](h - 0.1) + q[2](h - 0.2) + (h - 0.3) + q[4](h - 0.4) + q[5](h - 0.5))
    )


def test_resnet18_gets_one_quantizer_per_call_site():
    model = torchvision.models.resnet18(num_classes=10)
    sites = quantize_activations_(model)
    # stem ReLU + 2 call sites of the shared `relu` in each of the 8 BasicBlocks
    assert len(sites) == 17
    assert sites[:3] == ["relu", "layer1.0.relu", "layer1.0.relu_1"]
    quantizers = {n: m for n, m in model.named_modules() if isinstance(m, QuantReLU)}
    assert len(quantizers) == 17 and not any(type(m) is nn.ReLU for m in model.modules())
    calls: dict[str, int] = {}
    for name, q in quantizers.items():
        q.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    counter = CountReLUCalls()
    with counter:
        model.eval()(torch.randn(2, 3, 32, 32))
    assert counter.calls == 0 and calls == dict.fromkeys(sites, 1)
    assert isinstance(model.layer1[0], torchvision.models.resnet.BasicBlock)


def test_recipe_rebuilds_the_same_model():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    quantize_activations_(model, bits=2, exclude="layer4.*")
    (recipe,) = recipes_on(model)
    assert recipe["kind"] == "activations" and recipe["version"] == 1
    assert recipe["arguments"]["bits"] == 2 and recipe["arguments"]["exclude"] == ["layer4.*"]
    assert len(recipe["sites"]) == 13

    fresh = torchvision.models.resnet18(num_classes=10)
    assert apply_recipe(fresh, recipe) == recipe["sites"]
    assert list(fresh.state_dict()) == list(model.state_dict())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), model.eval()(x))


def test_deepcopy_and_pickle_keep_the_rewritten_forward():
    model = AllForms()
    quantize_activations_(model)
    x = torch.randn(4, 6)
    y = model(x)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(clone(x), y)
        assert clone.inner.forward.owner is clone.inner  # bound to the copy, not to the original
        clone.inner.relu_fx_0.alpha.data.fill_(0.5)
        assert torch.equal(model(x), y)


def test_alpha_modes():
    m = AllForms()
    quantize_activations_(m, bits=4)
    assert isinstance(m.act.alpha, nn.Parameter) and float(m.act.alpha.detach()) == pytest.approx(0.1946)
    m = AllForms()
    quantize_activations_(m, bits=2, alpha="fixed")
    assert not isinstance(m.act.alpha, nn.Parameter) and float(m.act.alpha) == pytest.approx(0.6511)
    m = AllForms()  # b=3 is not a published constant: computed, and still the half-Gaussian optimum 0.3534
    quantize_activations_(m, bits=3, alpha="fixed")
    assert float(m.act.alpha) == pytest.approx(0.3534, abs=1e-4)
    m = AllForms()
    quantize_activations_(m, alpha=0.25)
    assert m.act.alpha_mode == "fixed" and float(m.act.alpha) == 0.25
    m = AllForms()
    quantize_activations_(m, alpha="calibrate", calibration_batches=2)
    assert m.act.alpha_mode == "calibrate" and m.act.calibration_batches == 2
    assert sum(1 for p in m.parameters() if p.dim() == 0) == 0


def test_include_exclude_and_shared_module_name():
    m = AllForms()
    sites = quantize_activations_(m, include=["inner.*", "shared"], exclude=["inner.relu_fx_5"])
    # `shared` (the module's name) selects both of its call sites
    assert sites == ["shared", "shared_1"] + [f"inner.relu_fx_{i}" for i in range(5)]
    assert type(m.act) is nn.ReLU and isinstance(m.shared_1, QuantReLU)
    counter = CountReLUCalls()
    with counter:
        m(torch.randn(3, 6))
    assert counter.calls == 5  # act, act_inplace, seq.1, F.relu at the root, inner's last relu_


def _snapshot(m: nn.Module):
    return (repr(m), list(m.state_dict()), dict(m.__dict__).keys(), [type(c) for c in m.modules()])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"include": ["inner.*", "nothere*"]}, r"nothere\*"),
        ({"exclude": "*"}, r"no ReLU site left after include=None exclude=\['\*'\]"),
    ],
)
def test_bad_selection_errors_and_leaves_model_unchanged(kwargs, match):
    m = AllForms()
    before, x = _snapshot(m), torch.randn(2, 6)
    y = m(x)
    with pytest.raises(ValueError, match=match):
        quantize_activations_(m, **kwargs)
    assert _snapshot(m) == before and torch.equal(m(x), y)
    assert "forward" not in m.__dict__ and "forward" not in m.inner.__dict__


def test_no_relu_is_an_error():
    m = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with pytest.raises(ValueError, match="no ReLU found in Sequential"):
        quantize_activations_(m)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, "`bits` must be an int in 1..8"),
        ({"ste": "nope"}, "unknown `ste` 'nope'; available: clipped_relu"),
        ({"alpha": "auto"}, "allowed: 'learned', 'fixed', 'calibrate' or a number > 0"),
        ({"alpha": -1.0}, "finite number > 0"),
        ({"alpha_grad": "max"}, "allowed: ae, mean, min, pact"),
        ({"rounding": "floor"}, "allowed: ceil, nearest"),
        ({"alpha_lr_scale": -0.1}, "alpha_lr_scale"),
        ({"calibration_batches": 0}, "calibration_batches"),
        ({"include": 3}, "`include` must be None"),
        ({"dry_run": "yes"}, "`dry_run` must be a bool"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_activations_(AllForms(), **kwargs)


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:  # fx cannot trace this
            return F.relu(self.fc(x))
        return self.act(self.fc(x))


class ModeDependent(nn.Module):
    def forward(self, x):
        return F.relu(x) if self.training else torch.relu(x) * 2


def test_untraceable_modules_stay_float_with_one_warning():
    m = nn.Sequential(DataDependent(), ModeDependent(), nn.ReLU())
    with pytest.warns(UserWarning) as record:
        sites = quantize_activations_(m)
    messages = [str(w.message) for w in record if "could not be traced" in str(w.message)]
    assert len(messages) == 1
    assert "0 (DataDependent): TraceError" in messages[0]
    assert "1 (ModeDependent): its forward depends on self.training" in messages[0]
    # nn.ReLU children of an untraceable module are still converted (one quantizer per module)
    assert sites == ["2", "0.act"]
    assert "forward" not in m[0].__dict__ and "forward" not in m[1].__dict__


def test_parametrized_layers_are_leaves():
    """A weight-quantized Linear (a parametrization) is called, not traced into, by the rewritten forward."""

    class Sign(nn.Module):
        def forward(self, w):
            return w.sign() * w.abs().mean()

    m = Inner()
    parametrize.register_parametrization(m.fc1, "weight", Sign())
    quantize_activations_(m)
    assert parametrize.is_parametrized(m.fc1)
    assert "fc1.parametrizations.weight.original" in m.state_dict()
    x = torch.randn(4, 6)
    m(x).sum().backward()
    assert m.fc1.parametrizations.weight.original.grad is not None
    m.fc1.parametrizations.weight.original.data.mul_(3)  # the graph reads the live weight, not a constant
    before = m(x)
    m.fc1.parametrizations.weight.original.data.mul_(-1)
    assert not torch.equal(m(x), before)


def test_dry_run_prints_the_plan_and_changes_nothing(capsys):
    m = AllForms()
    before = _snapshot(m)
    sites = quantize_activations_(m, bits=2, alpha="calibrate", exclude="seq.*", dry_run=True)
    assert sites == [s for s in EXPECTED_SITES if s != "seq.1"]
    assert _snapshot(m) == before and not recipes_on(m)
    out = capsys.readouterr().out
    assert "would convert 11 ReLU call site(s)" in out
    assert "shared_1" in out and "call 2/2 of shared shared" in out
    assert "bits=2 ste=clipped_relu alpha=calibrate (1 batch)" in out
    assert "Left out by include=None exclude=['seq.*'] (1): seq.1" in out


def test_plan_lists_untraced_modules():
    plan = plan_activations(nn.Sequential(DataDependent()), alpha=0.3)
    text = plan.format()
    assert "alpha=fixed 0.3" in text and "Not traced" in text and "0 (DataDependent)" in text
