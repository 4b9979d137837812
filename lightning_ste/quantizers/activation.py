"""The b-bit quantized ReLU (docs/math.md §1; YLZ19, BCGD19): the autograd function and its module.

``sigma(x) = alpha * clamp(ceil(x / alpha), 0, L)`` forward; backward the STE proxy to ``x`` (docs/math.md §1.1,
LYX21) and the BCGD19 proxy to ``alpha`` (§1.2). The forward and backward run on the backend
:func:`lightning_ste.kernels.backend.backend_for` picks; all backends give the same values.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_ste.config import (
    ALPHA_CHOICES,
    ALPHA_FLOOR,
    check_choice,
    check_count,
    check_quantized_relu_args,
)
from lightning_ste.kernels import backend as _backend
from lightning_ste.kernels import cpu as cpu_kernels
from lightning_ste.quantizers import ste as ste_registry
from lightning_ste.quantizers.resolution import half_gaussian_resolution

__all__ = ["ALPHA_MODES", "QuantReLU", "quantized_relu", "quantized_relu_unchecked"]

#: How a :class:`QuantReLU` gets its alpha: the config's string choices.
ALPHA_MODES = ALPHA_CHOICES

# Region codes saved for backward (one byte per element): x <= 0, 0 < x <= L*alpha, x > L*alpha.
_BELOW, _INSIDE, _ABOVE = 0, 1, 2


def _alpha_grad_weights(alpha_grad: str, bits: int) -> tuple[float, float]:
    """BCGD19 proxy d sigma / d alpha on the regions (0 < x <= L alpha, x > L alpha) (docs/math.md §1.2)."""
    levels = 2**bits - 1
    return {
        "mean": (float(2 ** (bits - 1)), float(levels)),
        "min": (1.0, float(levels)),
        "pact": (0.0, float(levels)),
    }[alpha_grad]


def _region_mask(code: Tensor, regions: tuple[float, float, float], dtype: torch.dtype) -> Tensor | None:
    """Multiplier of a piecewise-constant proxy from the region code; None when it is 1 everywhere."""
    if regions == (1.0, 1.0, 1.0):
        return None
    if regions == (0.0, 1.0, 0.0):
        return code == _INSIDE
    if regions == (0.0, 1.0, 1.0):
        return code != _BELOW
    table = torch.tensor(regions, dtype=dtype, device=code.device)
    return table[code.long()]


class _QuantizedReLU(torch.autograd.Function):
    """sigma(x) = alpha * clamp(round(x / alpha), 0, L); backward: STE to x, BCGD19 proxy to alpha."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        alpha: Tensor,
        bits: int,
        ste_name: str,
        alpha_grad: str,
        alpha_lr_scale: float,
        rounding: str,
    ) -> Tensor:
        levels = 2**bits - 1
        entry = ste_registry.get(ste_name)
        ctx.bits, ctx.alpha_grad, ctx.alpha_lr_scale = bits, alpha_grad, alpha_lr_scale
        ctx.regions, ctx.derivative = entry.regions, entry.derivative
        grad_alpha = ctx.needs_input_grad[1]
        ctx.backend = _backend.backend_for(x, ste_name)
        ctx.packed = ctx.backend == "cpu"
        need_code = grad_alpha or entry.regions not in (None, (1.0, 1.0, 1.0))
        keep_y = grad_alpha and alpha_grad == "ae"
        if ctx.backend == "triton":
            # One Triton kernel: y and a 2-bit region code (the log-tailed proxy keeps x instead).
            tk = _backend.triton_module()
            assert tk is not None  # backend_for chose Triton: it imported
            xd = x if tk.dense(x) else x.contiguous()
            y, code = tk.relu_forward(
                xd, alpha, levels, rounding == "nearest", need_code and entry.regions is not None
            )
            ctx.strides = y.stride()
            ctx.save_for_backward(
                xd if entry.regions is None else None,
                alpha,
                code if need_code and entry.regions is not None else None,
                y if keep_y else None,
            )
            return y
        if ctx.packed:
            # Fused CPU kernel: the same values in one pass, and a 2-bit region code instead of a byte.
            a = alpha.detach().to(x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)
            y, code = cpu_kernels.relu_forward(x, a.clamp_min(ALPHA_FLOOR), levels, rounding == "nearest")
            ctx.strides = y.stride()
            need_code = grad_alpha or entry.regions != (1.0, 1.0, 1.0)
            ctx.save_for_backward(None, alpha, code if need_code else None, y if keep_y else None)
            return y
        # Half-precision inputs are quantized in float32 so the region tests and levels are exact, then
        # the levels are rounded once to the input dtype.
        compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
        a = alpha.detach().to(compute.dtype).clamp_min(ALPHA_FLOOR)
        top = a * levels
        k = torch.div(compute, a)
        if rounding == "ceil":
            k.ceil_()
        else:
            k.round_()
        y = k.clamp_(0, levels).mul_(a)
        # +-inf must not land on a level (NaN already propagates through clamp).
        y = torch.where(torch.isinf(compute), compute, y).to(x.dtype)

        code = (compute > 0).to(torch.uint8).add_(compute > top) if need_code else None
        # Only an input-dependent proxy (log-tailed, user-registered) keeps x; the others a byte code.
        ctx.save_for_backward(
            x if entry.regions is None else None,
            alpha,
            code,
            y if grad_alpha and alpha_grad == "ae" else None,
        )
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, alpha, code, y = ctx.saved_tensors
        if ctx.backend == "triton":
            return _QuantizedReLU._triton_backward(ctx, grad_y, x, alpha, code, y)
        if ctx.packed:
            return _QuantizedReLU._packed_backward(ctx, grad_y, alpha, code, y)
        a = alpha.detach().float().clamp_min(ALPHA_FLOOR)
        levels = 2**ctx.bits - 1
        grad_x = grad_alpha = None
        if ctx.needs_input_grad[0]:
            if ctx.regions is None:
                compute = x if x.dtype in (torch.float32, torch.float64) else x.float()
                ac = a.to(compute.dtype)
                grad_x = grad_y * ctx.derivative(compute, ac * levels).to(grad_y.dtype)
            else:
                mult = _region_mask(code, ctx.regions, grad_y.dtype)
                grad_x = grad_y if mult is None else grad_y * mult
        if ctx.needs_input_grad[1]:
            g = grad_y.float()
            if ctx.alpha_grad == "ae":
                # a.e. exact: d sigma / d alpha = k = y / alpha (the integer level of each element).
                total = (g * y.float()).sum() / a
            else:
                inside_w, above_w = _alpha_grad_weights(ctx.alpha_grad, ctx.bits)
                total = torch.where(code == _ABOVE, g, 0.0).sum() * above_w
                if inside_w:
                    total = total + torch.where(code == _INSIDE, g, 0.0).sum() * inside_w
            grad_alpha = (total * ctx.alpha_lr_scale).clamp(-1.0, 1.0).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None, None

    @staticmethod
    def _triton_backward(
        ctx, grad_y: Tensor, x: Tensor | None, alpha: Tensor, code: Tensor | None, y: Tensor | None
    ):
        # One Triton kernel: grad_y * mu'(x) and the alpha gradient, reduced on the device.
        tk = _backend.triton_module()
        assert tk is not None  # the forward ran on Triton
        if ctx.regions is None:
            gx_kind = tk.GX_LOG_TAILED if ctx.needs_input_grad[0] else tk.GX_NONE
        elif ctx.needs_input_grad[0] and ctx.regions != (1.0, 1.0, 1.0):
            gx_kind = tk.GX_REGIONS
        else:
            gx_kind = tk.GX_NONE
        if not ctx.needs_input_grad[1]:
            alpha_kind, weights = tk.ALPHA_NONE, (0.0, 0.0)
        elif ctx.alpha_grad == "ae":
            alpha_kind, weights = tk.ALPHA_AE, (0.0, 0.0)
        else:
            alpha_kind, weights = tk.ALPHA_REGIONS, _alpha_grad_weights(ctx.alpha_grad, ctx.bits)
        grad_x = grad_y if ctx.needs_input_grad[0] and gx_kind == tk.GX_NONE else None
        if gx_kind == tk.GX_NONE and alpha_kind == tk.ALPHA_NONE:
            return grad_x, None, None, None, None, None, None
        if grad_y.stride() != ctx.strides:  # the kernels read the gradient in the forward's memory order
            grad_y = torch.empty_strided(
                grad_y.shape, ctx.strides, dtype=grad_y.dtype, device=grad_y.device
            ).copy_(grad_y)
        gx, grad_alpha = tk.relu_backward(
            grad_y,
            x if ctx.regions is None else code,
            alpha,
            2**ctx.bits - 1,
            from_x=ctx.regions is None,
            gx_kind=gx_kind,
            multipliers=ctx.regions or (0.0, 0.0, 0.0),
            alpha_kind=alpha_kind,
            alpha_weights=weights,
            alpha_lr_scale=ctx.alpha_lr_scale,
            y=y,
        )
        if gx is not None:
            grad_x = gx
        if grad_alpha is not None and grad_alpha.dtype != alpha.dtype:
            grad_alpha = grad_alpha.to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None, None

    @staticmethod
    def _packed_backward(ctx, grad_y: Tensor, alpha: Tensor, code: Tensor | None, y: Tensor | None):
        # One fused pass gives grad_y * m[region] and the sums of grad_y over the inside/above regions.
        mult = ctx.regions if ctx.needs_input_grad[0] and ctx.regions != (1.0, 1.0, 1.0) else None
        want_sums = ctx.needs_input_grad[1] and ctx.alpha_grad != "ae"
        grad_x = grad_y if ctx.needs_input_grad[0] else None
        sums = None
        if mult is not None or want_sums:
            assert code is not None  # saved whenever a multiplier or the sums need it
            gx, sums = cpu_kernels.relu_backward(grad_y, code, ctx.strides, mult, want_sums)
            grad_x = gx if mult is not None else grad_x
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            if ctx.alpha_grad == "ae":
                assert y is not None  # kept by the forward for "ae"
                a = alpha.detach().float().clamp_min(ALPHA_FLOOR)
                total = (grad_y.float() * y.float()).sum() / a
            else:
                assert sums is not None  # want_sums
                inside_w, above_w = _alpha_grad_weights(ctx.alpha_grad, ctx.bits)
                total = sums[1] * above_w
                if inside_w:  # "pact" ignores the inside region: even a non-finite sum there
                    total = total + sums[0] * inside_w
                total = total.float()
            grad_alpha = (total * ctx.alpha_lr_scale).clamp(-1.0, 1.0).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None, None


def quantized_relu(
    x: Tensor,
    alpha: Tensor,
    bits: int,
    ste: str = "clipped_relu",
    alpha_grad: str = "mean",
    alpha_lr_scale: float = 0.01,
    rounding: str = "ceil",
) -> Tensor:
    """b-bit staircase ReLU with resolution alpha, trained with a coarse gradient (docs/math.md §1; YLZ19, BCGD19).

    Forward (``rounding="ceil"``): 0 for x <= 0, ``alpha * ceil(x / alpha)`` up to ``L * alpha``,
    ``L = 2**bits - 1``; ``"nearest"`` uses ``alpha * clamp(round(x / alpha), 0, L)``. ``alpha`` is a
    0-dim tensor, clamped to ``[1e-3, inf)``. Backward to ``x`` multiplies by the proxy derivative of the
    STE ``ste`` (see :mod:`lightning_ste.quantizers.ste`); backward to ``alpha`` is
    ``clamp(alpha_lr_scale * sum(grad * d~sigma/d alpha), -1, 1)`` with the ``alpha_grad`` proxy.

    Runs on the backend :func:`lightning_ste.kernels.backend.backend_for` picks (``LIGHTNING_STE_KERNELS``): the
    fused CPU kernels, the fused Triton kernels on CUDA, or the eager torch formula; all give the same values.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        dtype = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"`x` must be a floating-point tensor, got {dtype}")
    if not isinstance(alpha, Tensor) or alpha.dim() != 0 or not alpha.is_floating_point():
        got = f"shape {tuple(alpha.shape)}" if isinstance(alpha, Tensor) else type(alpha).__name__
        raise ValueError(f"`alpha` must be a 0-dim floating-point tensor, got {got}")
    check_quantized_relu_args(bits, ste, alpha_grad, alpha_lr_scale, rounding)
    # Reading alpha's value is free on the CPU; on an accelerator it would synchronise, so it is skipped.
    if alpha.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(alpha.detach() > 0):
        raise ValueError(f"`alpha` must be > 0, got {float(alpha):g}")
    return _QuantizedReLU.apply(x, alpha, bits, ste, alpha_grad, float(alpha_lr_scale), rounding)


def quantized_relu_unchecked(
    x: Tensor, alpha: Tensor, bits: int, ste: str, alpha_grad: str, alpha_lr_scale: float, rounding: str
) -> Tensor:
    """:func:`quantized_relu` without argument checks, for modules that validated them at construction."""
    return _QuantizedReLU.apply(x, alpha, bits, ste, alpha_grad, alpha_lr_scale, rounding)


class QuantReLU(nn.Module):
    """b-bit staircase ReLU with resolution ``alpha`` and a straight-through backward (YLZ19, BCGD19).

    ``alpha_mode``: ``"learned"`` (``alpha`` is a parameter trained with the BCGD19 proxy gradient),
    ``"fixed"`` (a frozen buffer), or ``"calibrate"`` (``max|x| / L`` over the first
    ``calibration_batches`` training batches, then frozen). ``alpha=None`` starts from
    :func:`~lightning_ste.quantizers.resolution.half_gaussian_resolution`.
    """

    def __init__(
        self,
        bits: int = 4,
        alpha: float | None = None,
        alpha_mode: str = "learned",
        ste: str = "clipped_relu",
        alpha_grad: str = "mean",
        alpha_lr_scale: float = 0.01,
        rounding: str = "ceil",
        calibration_batches: int = 1,
    ) -> None:
        super().__init__()
        check_quantized_relu_args(bits, ste, alpha_grad, alpha_lr_scale, rounding)
        check_choice("alpha_mode", alpha_mode, ALPHA_MODES)
        if alpha is None:
            alpha = half_gaussian_resolution(bits)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 < float(alpha) < float("inf")
        ):
            raise ValueError(f"`alpha` must be a finite number > 0, got {alpha!r}")
        check_count("calibration_batches", calibration_batches)
        self.bits, self.ste, self.alpha_grad = bits, ste, alpha_grad
        self.alpha_lr_scale, self.rounding, self.alpha_mode = float(alpha_lr_scale), rounding, alpha_mode
        self.calibration_batches = calibration_batches
        self.calibrated_batches = 0
        value = torch.tensor(float(alpha), dtype=torch.float32)
        if alpha_mode == "learned":
            self.alpha = nn.Parameter(value)
        else:
            self.register_buffer("alpha", value)

    @property
    def levels(self) -> int:
        """L = 2**bits - 1, the number of levels above zero."""
        return 2**self.bits - 1

    @property
    def calibrating(self) -> bool:
        return self.alpha_mode == "calibrate" and self.calibrated_batches < self.calibration_batches

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.calibrating:
            self._calibrate(x)
        return quantized_relu_unchecked(
            x, self.alpha, self.bits, self.ste, self.alpha_grad, self.alpha_lr_scale, self.rounding
        )

    @torch.no_grad()
    def _calibrate(self, x: Tensor) -> None:
        # Running max over the calibration batches, stored as alpha = max|x| / L (BCGD19 code).
        estimate = x.detach().abs().amax().float() / self.levels
        if self.calibrated_batches:
            estimate = torch.maximum(estimate, self.alpha)
        self.alpha.copy_(estimate.clamp_min(ALPHA_FLOOR))
        self.calibrated_batches += 1

    def get_extra_state(self) -> dict[str, Any]:
        return {"calibrated_batches": self.calibrated_batches}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or set(state) != {"calibrated_batches"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"QuantReLU extra state must have exactly the key ['calibrated_batches'], got {keys}"
            )
        self.calibrated_batches = int(state["calibrated_batches"])

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, alpha={float(self.alpha.detach()):.4g}, alpha_mode={self.alpha_mode}, "
            f"ste={self.ste}, alpha_grad={self.alpha_grad}, rounding={self.rounding}"
        )
