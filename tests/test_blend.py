"""The BCGD blend and ρ schedule (docs/math.md §3; BCGD19), and weight conversion on plain modules."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_ste.blend import RhoSchedule, bcgd_blend_, blend_, check_rho, grads_finite
from lightning_ste.functional import quantize_weight
from lightning_ste.inspect import quantized_layers
from lightning_ste.quantizers.weight import WeightQuantizer
from lightning_ste.recipe import recipes_on
from lightning_ste.surgery.weight_params import apply_recipe, plan_weights, quantize_weights_


def test_blend_is_the_convex_combination_in_float64() -> None:
    w = torch.randn(7, 5, dtype=torch.float64)
    q = quantize_weight(w, 1).detach()
    for rho in (1e-5, 0.3, 1.0):
        expected = (1 - rho) * w + rho * q
        out = blend_(w.clone(), q, rho)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-15)
        torch.testing.assert_close(
            blend_(w.clone(), q, torch.tensor(rho, dtype=torch.float64)), expected, rtol=0, atol=1e-15
        )
    assert torch.equal(blend_(w.clone(), q, 0.0), w)
    assert torch.equal(blend_(w.clone(), q, 1.0), q)


def test_grads_finite_flags_inf_and_nan() -> None:
    a, b = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2))
    assert grads_finite([a, b]) is None
    a.grad, b.grad = torch.ones(3), torch.ones(2)
    assert bool(grads_finite([a, b]))
    b.grad[1] = float("inf")
    assert not bool(grads_finite([a, b]))
    b.grad[1] = float("nan")
    assert not bool(grads_finite([a, b]))


def test_bcgd_blend_skips_on_non_finite_and_rho_zero() -> None:
    w = torch.randn(4, 4)
    before = w.clone()
    q = lambda t: quantize_weight(t, 1).detach()  # noqa: E731
    bcgd_blend_([(w, q)], 0.5, torch.tensor(False))
    assert torch.equal(w, before)

    def must_not_run(t: torch.Tensor) -> torch.Tensor:
        raise AssertionError("rho = 0 must not compute q(W)")

    bcgd_blend_([(w, must_not_run)], 0.0)
    assert torch.equal(w, before)
    bcgd_blend_([(w, q)], 0.5, torch.tensor(True))
    torch.testing.assert_close(w, 0.5 * before + 0.5 * q(before))


def test_skipped_amp_step_leaves_latent_unblended_with_a_real_grad_scaler() -> None:
    """A CPU GradScaler step with an injected inf gradient: the blend guard and scaler.step both skip."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    quantize_weights_(model, bits=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    layers = [(latent, q.quantize) for _, _, latent, q in quantized_layers(model)]
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    latents = [latent for latent, _ in layers]
    blended_steps = 0
    for step in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step == 2:
            latents[1].grad[0, 0] = float("inf")
        scaler.unscale_(opt)
        before = [w.detach().clone() for w in latents]
        q_before = [q(w.detach()) for w, q in layers]
        finite = grads_finite(p for g in opt.param_groups for p in g["params"])
        bcgd_blend_(layers, 0.25, finite)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped = scaler.get_scale() < scale
        assert skipped == (step == 2)
        for w, b, qb in zip(latents, before, q_before):
            if skipped:
                assert not torch.equal(qb, b)  # a blend would have moved W
                assert torch.equal(w.detach(), b)
            else:
                assert not torch.equal(w.detach(), b)
        blended_steps += not skipped
    assert blended_steps == 3


def test_rate_max_schedule_matches_bcgd_code_recurrence() -> None:
    s = RhoSchedule(0.01, (2.0, 0.1))
    seen = [s.start_epoch(e) for e in range(5)]
    assert seen == pytest.approx([0.02, 0.04, 0.08, 0.1, 0.1], rel=0, abs=1e-15)
    assert s.start_epoch(4) == pytest.approx(0.1)  # a repeated start (resume mid-epoch) changes nothing
    restored = RhoSchedule(0.01, (2.0, 0.1))
    s2 = RhoSchedule(0.01, (2.0, 0.1))
    s2.start_epoch(0)
    s2.start_epoch(1)
    restored.load_state_dict(s2.state_dict())
    assert restored.start_epoch(1) == s2.rho == pytest.approx(0.04)
    assert restored.start_epoch(2) == pytest.approx(0.08)
    rho = 1e-5
    code = RhoSchedule(rho, (1.01, 0.01))
    for e in range(3):
        rho = min(rho * 1.01, 0.01)
        assert code.start_epoch(e) == rho


def test_constant_and_callable_schedules() -> None:
    assert RhoSchedule(0.2).start_epoch(3) == 0.2
    s = RhoSchedule(0.0, lambda e: 0.1 * e)
    assert [s.start_epoch(e) for e in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    assert RhoSchedule(0.0, lambda e: torch.tensor(0.5)).start_epoch(1) == 0.5


@pytest.mark.parametrize("rho", [-0.1, 1.5, math.nan, math.inf, True, "0.1", None])
def test_bad_rho(rho: object) -> None:
    with pytest.raises(ValueError, match="`rho`"):
        check_rho(rho)
    with pytest.raises(ValueError, match="`rho`"):
        RhoSchedule(rho)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "schedule", ["fast", (1.01,), (0.0, 0.01), (1.01, 2.0), ("a", 0.1), (math.nan, 0.1), lambda e: "x"]
)
def test_bad_schedule(schedule: object) -> None:
    with pytest.raises(ValueError, match="`rho_schedule`"):
        RhoSchedule(1e-5, schedule)  # type: ignore[arg-type]


def test_callable_schedule_failing_later_names_argument() -> None:
    s = RhoSchedule(1e-5, lambda e: 0.1 if e < 2 else float("nan"))
    s.start_epoch(1)
    with pytest.raises(ValueError, match="`rho_schedule` must return a number in \\[0, 1\\].*epoch 2"):
        s.start_epoch(2)


# ------------------------------------------------------------------------------- plain conversion


class DefinedBackwards(nn.Module):
    """Definition order head, body, stem; execution order stem, body, head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.stem = nn.Conv1d(1, 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x).flatten(1)[:, :8]
        return self.head(torch.relu(self.norm(self.body(h))))


def test_quantize_weights_parametrizes_only_weights() -> None:
    m = DefinedBackwards()
    latent = m.body.weight.detach().clone()
    names = quantize_weights_(m, bits=2)
    assert names == ["head", "body", "stem"]
    assert torch.equal(m.body.parametrizations.weight.original.detach(), latent)
    torch.testing.assert_close(m.body.weight, quantize_weight(latent, 2))
    assert m.body.weight.unique().numel() <= 3
    keys = set(m.state_dict())
    assert {
        "body.bias",
        "norm.weight",
        "norm.bias",
        "head.bias",
        "body.parametrizations.weight.original",
    } <= keys
    assert "body.weight" not in keys
    assert recipes_on(m)[-1]["sites"] == names


def test_keep_first_last_uses_execution_order_and_apply_recipe_rebuilds() -> None:
    m = DefinedBackwards()
    x = torch.randn(4, 1, 12)
    m.train()
    stats = m.norm.running_mean.clone()
    names = quantize_weights_(m, keep_first_last=True, example_input=x)
    assert names == ["body"]
    assert m.training and torch.equal(m.norm.running_mean, stats)  # the probe ran in eval mode, no grad
    plan = plan_weights(DefinedBackwards(), keep_first_last=True, example_input=x)
    assert plan.kept_first_last == ["stem", "head"]
    assert "kept by `keep_first_last` (first in execution order)" in plan.format()

    fresh = DefinedBackwards()
    assert apply_recipe(fresh, recipes_on(m)[0]) == ["body"]
    assert set(fresh.state_dict()) == set(m.state_dict())
    fresh.load_state_dict(m.state_dict())
    m.eval(), fresh.eval()
    assert torch.equal(fresh(x), m(x))


def test_dry_run_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    m = DefinedBackwards()
    keys = list(m.state_dict())
    assert quantize_weights_(m, include="b*", dry_run=True) == ["body"]
    assert list(m.state_dict()) == keys and not recipes_on(m)
    out = capsys.readouterr().out
    assert "quantize  body" in out and "float     head (Linear): not matched by `include`" in out


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"bits": 0}, "bits"),
        ({"bits": 9}, "bits"),
        ({"bits": 1.0}, "bits"),
        ({"include": "nothing*"}, "include"),
        ({"exclude": "*"}, "exclude"),
        (
            {"include": "stem", "keep_first_last": True, "example_input": torch.randn(2, 1, 12)},
            "keep_first_last",
        ),
        ({"keep_first_last": True}, "example_input"),
        ({"layer_types": (nn.Conv3d,)}, "layer_types"),
        ({"layer_types": (int,)}, "layer_types"),
        ({"ternary_scale": "x"}, "ternary_scale"),
        ({"per_channel": "yes"}, "per_channel"),
    ],
)
def test_bad_conversion_leaves_module_unchanged(kwargs: dict, name: str) -> None:
    m = DefinedBackwards()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=f"`{name}`"):
        quantize_weights_(m, **kwargs)
    after = m.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not recipes_on(m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 1},
        {"bits": 1, "per_channel": True},
        {"bits": 1, "binary_scale": "median"},
        {"bits": 2},
        {"bits": 4, "per_channel": True},
    ],
)
def test_weight_quantizer_blend_equals_the_formula(dtype: torch.dtype, kwargs: dict) -> None:
    """The quantizer's own (fused where possible) blend gives exactly W.mul_(1 - ρ).add_(q(W) ρ)."""
    quantizer = WeightQuantizer(**kwargs)
    gen = torch.Generator().manual_seed(3)
    for rho in (1e-5, 0.3, 1.0):
        w = torch.randn(24, 7, 3, 3, generator=gen, dtype=dtype)
        w[0, 0] = 0.0  # sign(0) = 0 at the boundary
        expected = w.clone().mul_(1 - rho).add_(quantizer.quantize(w) * rho)
        assert quantizer.blend_(w, rho) is w
        assert torch.equal(w, expected), (kwargs, rho)
        # rho as a device tensor (the accelerator path) gives the same values up to rounding of 1 - rho
        w2 = torch.randn(5, 9, generator=gen, dtype=dtype)
        ref = w2.clone().mul_(1 - rho).add_(quantizer.quantize(w2) * rho)
        torch.testing.assert_close(quantizer.blend_(w2, torch.tensor(rho, dtype=dtype)), ref)


def test_bcgd_blend_uses_the_quantizers_blend_and_the_finite_flag() -> None:
    quantizer = WeightQuantizer(bits=1)
    w = torch.randn(16, 32)
    before = w.clone()
    bcgd_blend_([(w, quantizer)], 0.1, torch.tensor(False))
    assert torch.equal(w, before)
    bcgd_blend_([(w, quantizer)], 0.1, torch.tensor(True))
    assert torch.equal(w, before.clone().mul_(1 - 0.1).add_(quantizer.quantize(before) * 0.1))


def test_blend_reuses_the_forward_scale_only_for_the_same_unchanged_weight() -> None:
    """After a forward, the blend of that same W uses the forward's mean|W| (same values as computing it);
    once W changed (an optimizer step, a blend) it computes mean|W| again."""
    quantizer = WeightQuantizer(bits=1)
    w = nn.Parameter(torch.randn(32, 16, 3, 3))
    for step in range(3):
        quantizer(w)
        with torch.no_grad():
            expected = w.detach().clone()
            q = quantize_weight(expected, 1)
            expected.mul_(1 - 0.2).add_(q * 0.2)
            version = w._version
            quantizer.blend_(w, 0.2)
            assert w._version > version  # the in-place blend is visible to autograd
            assert torch.equal(w, expected), step
            # a second blend without a forward must not reuse the (now stale) scale
            q = quantize_weight(expected, 1)
            expected.mul_(1 - 0.2).add_(q * 0.2)
            quantizer.blend_(w, 0.2)
            assert torch.equal(w, expected), step
            w.add_(torch.randn_like(w) * 0.1)  # an optimizer step
