"""Bad input, drawn by hypothesis: every invalid argument combination of the two callbacks and the two conversion
functions gets a ValueError that names an offending argument, at construction or at setup, and the model is
left exactly as it was (structure, state_dict, forward)."""

from __future__ import annotations

import math
import re
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from fixtures import quiet_trainer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ste import BlendedQuantWeights, QuantizeActivations, quantize_activations_, quantize_weights_
from lightning_ste.recipe import recipes_on

NAN, INF = float("nan"), float("inf")


class Small(pl.LightningModule):
    """conv - ReLU - conv - F.relu - linear: ReLU sites ``act``, ``relu_fx_0``; weight layers conv1, conv2, fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, stride=2)  # 5x5
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(3, 4, 3)  # 3x3
        self.fc = nn.Linear(36, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv2(self.act(self.conv1(x)))).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return F.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


X = torch.randn(8, 1, 11, 11, generator=torch.Generator().manual_seed(0))
DATA = TensorDataset(X, torch.arange(8) % 3)

# Arguments shared by both callbacks and their conversion functions: valid values and invalid ones. Invalid
# values here fail at construction (type, range, unknown name).
COMMON_VALID: dict[str, list[Any]] = {
    "bits": [1, 2, 4, 8],
    "include": [None, "*", ["conv*", "fc", "act", "relu_fx_*"]],
    "exclude": [None, [], "nothing*"],
    "dry_run": [False],
}
COMMON_INVALID: dict[str, list[Any]] = {
    "bits": [0, 9, -1, 2.0, True, "4", None],
    "include": [3, [1], [None], b"conv", {"conv1": 1}],
    "exclude": [3, [2.5], object()],
    "dry_run": [1, "yes", None],
}
ACT_VALID: dict[str, list[Any]] = {
    **COMMON_VALID,
    "ste": ["clipped_relu", "relu", "identity", "log_tailed_relu"],
    "alpha": ["learned", "fixed", "calibrate", 0.5, 1e-3, 3],
    "alpha_grad": ["ae", "mean", "min", "pact"],
    "alpha_lr_scale": [0.0, 0.01, 1],
    "rounding": ["ceil", "nearest"],
    "calibration_batches": [1, 3],
}
ACT_INVALID: dict[str, list[Any]] = {
    **COMMON_INVALID,
    "ste": ["straight", "", 3, None],
    "alpha": ["max", "", -1.0, 0, 1e-4, NAN, INF, -INF, True, None, [1.0]],
    "alpha_grad": ["exact", None, 1],
    "alpha_lr_scale": [-0.1, NAN, INF, "0.01", True, None],
    "rounding": ["up", "floor", None],
    "calibration_batches": [0, -2, 1.5, True, "1", None],
}
WEIGHT_VALID: dict[str, list[Any]] = {
    **COMMON_VALID,
    "keep_first_last": [False, True],
    "per_channel": [False, True],
    "ternary_scale": ["twn", "bcgd_code"],
    "binary_scale": ["mean", "median"],
    "layer_types": [(nn.Linear, nn.Conv2d), nn.Conv2d, [nn.Linear, nn.Conv2d, nn.Conv1d]],
}
WEIGHT_INVALID: dict[str, list[Any]] = {
    **COMMON_INVALID,
    "keep_first_last": [1, "yes", None],
    "per_channel": [1, "no", None],
    "ternary_scale": ["tw", "", None],
    "binary_scale": ["max", None],
    "layer_types": [nn.ReLU(), (), (int,), "Linear", [nn.Linear, 3], None],
}
BLEND_VALID: dict[str, list[Any]] = {
    "rho": [0.0, 1e-5, 0.5, 1, 1.0],
    "rho_schedule": [None, (1.01, 0.01), [2, 1]],
}
BLEND_INVALID: dict[str, list[Any]] = {
    "rho": [-0.1, 1.5, NAN, INF, "0.1", True, None],
    "rho_schedule": [
        (1.01,),
        (0.0, 0.01),
        (-1.0, 0.01),
        (INF, 0.01),
        (1.01, 2.0),
        (NAN, 0.01),
        (1.01, NAN),
        (True, 0.01),
        "fast",
        5,
        lambda epoch: 2.0,
        lambda epoch: "x",
    ],
}

# Values valid at construction that select nothing: the error comes at setup (or from the function call).
ACT_SELECTION: list[tuple[dict[str, Any], str]] = [
    ({"include": "nomatch*"}, "include"),
    ({"include": ["act", "nomatch"]}, "include"),
    ({"exclude": "*"}, "exclude"),
    ({"exclude": ["act", "relu_fx_*"]}, "exclude"),
    ({"include": "act", "exclude": "a*"}, "exclude"),
]
WEIGHT_SELECTION: list[tuple[dict[str, Any], str]] = [
    ({"include": "nomatch*"}, "include"),
    ({"include": ["conv1", "bn*"]}, "include"),
    ({"exclude": "*"}, "exclude"),
    ({"exclude": ["conv*", "fc"]}, "exclude"),
    ({"layer_types": (nn.Conv3d,)}, "layer_types"),
    ({"layer_types": nn.Conv1d}, "layer_types"),
    ({"keep_first_last": True, "include": ["conv1", "fc"]}, "keep_first_last"),
]


def names_argument(message: str, names: set[str]) -> bool:
    """Whether the message names one of ``names`` the way our errors do: in backticks (`name` or `name=...`)."""
    return any(re.search(rf"`{re.escape(n)}\b", message) for n in names)


@st.composite
def arguments(draw: st.DrawFn, valid: dict[str, list[Any]], invalid: dict[str, list[Any]]):
    """(kwargs, names made invalid): 1 to 3 arguments invalid, some of the others set to valid values."""
    bad = draw(st.lists(st.sampled_from(sorted(invalid)), min_size=1, max_size=3, unique=True))
    kwargs = {n: draw(st.sampled_from(invalid[n])) for n in bad}
    for n in draw(st.lists(st.sampled_from(sorted(set(valid) - set(bad))), max_size=4, unique=True)):
        kwargs[n] = draw(st.sampled_from(valid[n]))
    return kwargs, set(bad)


def snapshot(model: nn.Module) -> tuple[Any, ...]:
    with torch.no_grad():
        out = model.eval()(X)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return repr(model), state, out, dict(model.__dict__.get("_modules", {})), "forward" in model.__dict__


def assert_unchanged(model: nn.Module, before: tuple[Any, ...]) -> None:
    text, state, out, modules, own_forward = before
    assert repr(model) == text
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    assert dict(model._modules) == modules and ("forward" in model.__dict__) == own_forward
    assert not recipes_on(model)
    assert not any(hasattr(m, "parametrizations") for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model.eval()(X), out)


def fit(model: pl.LightningModule, callbacks: list[pl.Callback]) -> None:
    trainer = quiet_trainer(max_steps=1, callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, DataLoader(DATA, batch_size=4))


SETTINGS = settings(
    max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@SETTINGS
@given(arguments(ACT_VALID, ACT_INVALID))
def test_quantize_activations_refuses_invalid_arguments_at_construction(drawn):
    kwargs, bad = drawn
    with pytest.raises(ValueError) as error:
        QuantizeActivations(**kwargs)
    assert names_argument(str(error.value), bad), (kwargs, str(error.value))


@SETTINGS
@given(arguments({**WEIGHT_VALID, **BLEND_VALID}, {**WEIGHT_INVALID, **BLEND_INVALID}))
def test_blended_quant_weights_refuses_invalid_arguments_at_construction(drawn):
    kwargs, bad = drawn
    with pytest.raises(ValueError) as error:
        BlendedQuantWeights(**kwargs)
    assert names_argument(str(error.value), bad), (kwargs, str(error.value))


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(ACT_SELECTION),
    st.fixed_dictionaries({}, optional={n: st.sampled_from(ACT_VALID[n]) for n in ("bits", "alpha", "ste")}),
    st.sampled_from(WEIGHT_SELECTION),
    st.fixed_dictionaries(
        {}, optional={n: st.sampled_from(WEIGHT_VALID[n]) for n in ("bits", "per_channel")}
    ),
    st.sampled_from(["activations", "weights"]),
    st.booleans(),
)
def test_selection_that_finds_nothing_fails_at_setup_and_leaves_the_model_unchanged(
    act_selection, act_extra, weight_selection, weight_extra, which, partner_first
):
    """Also with the other callback listed first and converting the model before this one fails: both
    conversions are undone (nothing half-converted)."""
    model = Small()
    before = snapshot(model)
    if which == "activations":
        (selection, culprit), extra = act_selection, act_extra
        callback: pl.Callback = QuantizeActivations(**{**extra, **selection})
        partner: pl.Callback = BlendedQuantWeights()
    else:
        (selection, culprit), extra = weight_selection, weight_extra
        callback = BlendedQuantWeights(**{**extra, **selection})
        partner = QuantizeActivations()
    with pytest.raises(ValueError) as error:
        fit(model, [partner, callback] if partner_first else [callback])
    assert names_argument(str(error.value), {culprit}), str(error.value)
    assert_unchanged(model, before)
    if partner_first:  # the model still trains afterwards, converted by working callbacks
        fit(model, [QuantizeActivations(), BlendedQuantWeights()])
        assert recipes_on(model)


@SETTINGS
@given(
    st.one_of(
        arguments(ACT_VALID, ACT_INVALID).map(lambda d: ("activations", *d)),
        arguments(WEIGHT_VALID, WEIGHT_INVALID).map(lambda d: ("weights", *d)),
        st.sampled_from(ACT_SELECTION).map(lambda s: ("activations", s[0], {s[1]})),
        st.sampled_from(WEIGHT_SELECTION).map(lambda s: ("weights", s[0], {s[1]})),
    )
)
def test_conversion_functions_refuse_invalid_arguments_and_leave_the_model_unchanged(drawn):
    which, kwargs, bad = drawn
    model = Small()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        if which == "activations":
            quantize_activations_(model, **kwargs)
        else:
            quantize_weights_(model, example_input=X, **kwargs)
    assert names_argument(str(error.value), bad), (kwargs, str(error.value))
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("call", "culprit"),
    [
        (lambda m: quantize_activations_("model"), "module"),
        (lambda m: quantize_weights_("model"), "module"),
        (lambda m: quantize_weights_(m, keep_first_last=True), "example_input"),
        (
            lambda m: quantize_weights_(m, keep_first_last=True, example_input=torch.randn(2, 5)),
            "example_input",
        ),
        (lambda m: quantize_activations_(m.act), "module"),
    ],
)
def test_conversion_functions_name_a_bad_module_or_example_input(call, culprit):
    model = Small()
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        call(model)
    assert names_argument(str(error.value), {culprit}), str(error.value)
    assert_unchanged(model, before)


def test_invalid_values_are_really_invalid_and_valid_values_really_valid():
    """The tables above are right: each valid value alone constructs, each invalid value alone fails."""
    for cls, valid, invalid in (
        (QuantizeActivations, ACT_VALID, ACT_INVALID),
        (BlendedQuantWeights, {**WEIGHT_VALID, **BLEND_VALID}, {**WEIGHT_INVALID, **BLEND_INVALID}),
    ):
        for name, values in valid.items():
            for value in values:
                cls(**{name: value})
        for name, values in invalid.items():
            for value in values:
                with pytest.raises(ValueError, match=rf"`{name}\b"):
                    cls(**{name: value})
    # The float arguments' invalid values hold NaN and +inf: a bare `value > 0` check lets NaN through.
    for table, names in ((ACT_INVALID, ("alpha", "alpha_lr_scale")), (BLEND_INVALID, ("rho",))):
        for name in names:
            assert any(isinstance(v, float) and math.isnan(v) for v in table[name]), name
            assert INF in table[name], name
