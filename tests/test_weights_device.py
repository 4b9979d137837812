"""The weight path that CUDA takes (no fused CPU kernels), run here on CPU tensors: q(W) from the forward
reused by the blend, one multi-tensor blend over all layers, tied latents blended once, and the skip-step
decision taken from the GradScaler's own found-inf flag."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from lightning_ste import BlendedQuantWeights
from lightning_ste.blend import bcgd_blend_, blend_, multi_blend_, scaler_found_inf
from lightning_ste.functional import binary_weight_multi
from lightning_ste.inspect import quantized_layers
from lightning_ste.kernels import cpu as cpu_kernels
from lightning_ste.quantizers.weight import WeightQuantizer, prepare_weights_
from lightning_ste.surgery.weight_params import quantize_weights_


class CountOps(TorchDispatchMode):
    """Every aten op dispatched (on CUDA each is at least one kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def device_path() -> Iterator[None]:
    """The code path of CUDA tensors: the fused CPU kernels switched off."""
    previous = cpu_kernels._state.get("ok")
    cpu_kernels._state["ok"] = False
    try:
        yield
    finally:
        if previous is None:
            cpu_kernels._state.pop("ok", None)
        else:
            cpu_kernels._state["ok"] = previous


def _pairs(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shapes = [(7, 5), (3, 4, 3, 3), (11,), (1, 1)]
    ws = [torch.randn(s, dtype=dtype) for s in shapes]
    qs = [torch.sign(w) * w.abs().mean() for w in ws]
    return ws, qs


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_multi_blend_equals_the_per_layer_formula_bit_for_bit(dtype: torch.dtype) -> None:
    for rho in (1e-5, 0.3, torch.tensor(0.3)):
        ws, qs = _pairs(dtype)
        r = float(rho)
        expected = [(1 - r) * w + r * q for w, q in zip(ws, qs)]  # the formula, in w's dtype
        per_layer = [blend_(w.clone(), q, rho) for w, q in zip(ws, qs)]
        versions = [w._version for w in ws]
        multi_blend_(ws, qs, rho)
        for w, e, p, v in zip(ws, expected, per_layer, versions):
            assert torch.equal(w, p)
            if dtype == torch.float64:
                assert torch.equal(w, e)
            else:
                torch.testing.assert_close(w, e, rtol=1e-6, atol=1e-7)
            assert w._version > v  # autograd sees the in-place change


def test_multi_blend_blends_a_tied_latent_once() -> None:
    ws, qs = _pairs(torch.float64)
    once = blend_(ws[0].clone(), qs[0], 0.5)
    multi_blend_([ws[0], ws[1], ws[0]], [qs[0], qs[1], qs[0]], 0.5)
    assert torch.equal(ws[0], once)  # blended twice it would be 0.75 of the way to q

    shared = torch.randn(6, 6, dtype=torch.float64)
    q = WeightQuantizer(bits=2)
    expected = blend_(shared.clone(), q.quantize(shared), 0.5)
    bcgd_blend_([(shared, q), (shared, q)], 0.5)
    assert torch.equal(shared, expected)


def test_multi_blend_launches_do_not_grow_with_the_layer_count(device_path: None) -> None:
    counts = []
    for n_layers in (2, 8):
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(n_layers)])
        quantize_weights_(model, bits=1)
        layers = [(latent, q) for _, _, latent, q in quantized_layers(model)]
        model(torch.randn(4, 8)).sum().backward()
        with CountOps() as mode:
            bcgd_blend_(layers, 0.1)
        counts.append(len(mode.ops))
        assert set(mode.ops) <= {"_foreach_mul_", "_foreach_mul", "_foreach_add_"}, mode.ops
    assert counts[0] == counts[1] == 3


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_blend_reuses_the_forward_q_while_w_is_unchanged(device_path: None, bits: int) -> None:
    latent = nn.Parameter(torch.randn(5, 7))
    quantizer = WeightQuantizer(bits=bits)
    out = quantizer(latent)
    with CountOps() as mode:
        q = quantizer.for_blend(latent)
    assert mode.ops == []  # no pass over W: the forward's q(W)
    assert torch.equal(q, quantizer.quantize(latent)) and torch.equal(q, out.detach())

    quantizer(latent)
    with torch.no_grad():
        latent.mul_(-2.0)  # what the optimizer step does: W changes in place, its version moves
    q = quantizer.for_blend(latent)
    assert torch.equal(q, quantizer.quantize(latent))  # not the stale q of the old W
    assert not torch.equal(q, out.detach())

    with torch.no_grad():
        quantizer(latent)  # evaluation keeps nothing for a blend
    assert quantizer._q is None


def test_scaler_found_inf_is_the_flag_step_uses() -> None:
    layer = nn.Linear(4, 3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    for inject in (False, True):
        opt.zero_grad()
        scaler.scale(layer(torch.randn(2, 4)).sum()).backward()
        assert scaler_found_inf(scaler, opt) is None  # unscale_ has not run in this step
        if inject:
            layer.bias.grad[0] = float("inf")
        scaler.unscale_(opt)
        flag = scaler_found_inf(scaler, opt)
        assert flag is not None and float(flag) == float(inject)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        assert (scaler.get_scale() < scale) == inject


class _Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # W changes by the blend only


class _InfAfterUnscale(L.Callback):
    """Puts an inf in a float gradient after unscale_ has run: the scaler already decided to take the step."""

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any
    ) -> None:
        self.before = [w.detach().clone() for *_, w, _ in quantized_layers(pl_module)]
        self.quantizers = [q for *_, q in quantized_layers(pl_module)]
        pl_module.fc2.bias.grad[0] = float("inf")


def test_16_mixed_blend_follows_the_scalers_decision(device_path: None) -> None:
    from lightning.pytorch.plugins.precision import MixedPrecision

    probe = _InfAfterUnscale()
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**4))
    model = _Net()
    trainer = L.Trainer(
        max_steps=1, callbacks=[probe, BlendedQuantWeights(rho=0.5)], plugins=[plugin], accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    data = TensorDataset(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    trainer.fit(model, DataLoader(data, batch_size=8))
    assert plugin.scaler.get_scale() == 2.0**4  # the scaler took the step (found no inf at unscale_)
    for (*_, w, _), b, q in zip(quantized_layers(model), probe.before, probe.quantizers):
        # blended as the scaler stepped; a second pass over the gradients would have seen the inf and skipped
        assert torch.equal(w.detach(), blend_(b.clone(), q.quantize(b), 0.5))


def test_prepared_q_is_what_the_forward_uses_and_launches_do_not_grow(device_path: None) -> None:
    counts = []
    for n_layers in (2, 8):
        latents = [nn.Parameter(torch.randn(6 + i, 5)) for i in range(n_layers)]
        quantizers = [WeightQuantizer(bits=1) for _ in latents]
        with CountOps() as mode:
            prepare_weights_(zip(quantizers, latents))
        counts.append(len(mode.ops))
        for q, w in zip(quantizers, latents):
            with CountOps() as mode:
                out = q(w)
            assert [op for op in mode.ops if op not in ("alias", "view", "detach")] == []  # prepared: no pass
            assert torch.equal(out, binary_weight_multi([w.detach()])[0])  # the per-layer path's values
            torch.testing.assert_close(out, torch.sign(w) * w.abs().mean(), rtol=1e-6, atol=0)
    assert counts[0] == counts[1] == 4  # norm, divide, sign, multiply: multi-tensor ops, any layer count

    w, q = nn.Parameter(torch.randn(4, 4)), WeightQuantizer(bits=1)
    prepare_weights_([(q, w)])
    with torch.no_grad():
        w.mul_(-1.0)  # the optimizer step: the prepared q is stale now
    assert torch.equal(q(w), torch.sign(w) * binary_weight_multi([w.detach()])[0].abs())


def test_exported_binary_scale_is_the_device_forwards_to_the_last_bit(device_path: None) -> None:
    """weight_codes (export, summary, quantize_weight) and the device forward's multi-tensor q(W) agree bit for
    bit; a plain mean|W| differs from ||W||_1 / n in the last bit for many tensors, so a frozen or packed model
    would drift from the trained one."""
    from lightning_ste.functional import quantize_weight, weight_codes

    torch.manual_seed(3)
    ws = [torch.randn(97, 61) * 0.1 for _ in range(8)]
    assert any(w.abs().mean() != torch._foreach_norm([w], 1)[0] / w.numel() for w in ws)  # the trap is real
    for w, q_device in zip(ws, binary_weight_multi(ws)):
        codes, scale = weight_codes(w, bits=1)
        assert torch.equal(codes * scale, q_device)
        assert torch.equal(quantize_weight(w, bits=1), q_device)
