"""The math of docs/math.md §1–2: quantized ReLU with STE backward, weight quantizers, half-Gaussian resolution.

Pure functions: no module state, no Lightning. The only package import is the STE registry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import torch
from torch import Tensor

from lightning_ste import _kernels
from lightning_ste.quantizers import ste as _ste
from lightning_ste.kernels import backend as _backend

__all__ = [
    "ALPHA_FLOOR",
    "ALPHA_GRADS",
    "ROUNDINGS",
    "BINARY_SCALES",
    "TERNARY_SCALES",
    "half_gaussian_resolution",
    "quantize_weight",
    "quantized_relu",
    "weight_codes",
]

ALPHA_FLOOR = 1e-3
ROUNDINGS = ("ceil", "nearest")
ALPHA_GRADS = ("ae", "mean", "min", "pact")
TERNARY_SCALES = ("twn", "bcgd_code")
BINARY_SCALES = ("mean", "median")
MIN_BITS, MAX_BITS = 1, 8

# Region codes saved for backward (one byte per element): x <= 0, 0 < x <= L*alpha, x > L*alpha.
_BELOW, _INSIDE, _ABOVE = 0, 1, 2


def check_choice(name: str, value: object, allowed: tuple[str, ...] | list[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown `{name}` {value!r}; allowed: {', '.join(map(str, allowed))}")


def check_bits(bits: object, name: str = "bits") -> int:
    """Validate a bit-width: an int in 1..8."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"`{name}` must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return bits


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
        entry = _ste.get(ste_name)
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
            y, code = _kernels.relu_forward(x, a.clamp_min(ALPHA_FLOOR), levels, rounding == "nearest")
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
    def backward(ctx, grad_y: Tensor):  # type: ignore[override]
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
            gx, sums = _kernels.relu_backward(grad_y, code, ctx.strides, mult, want_sums)
            grad_x = gx if mult is not None else grad_x
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            if ctx.alpha_grad == "ae":
                a = alpha.detach().float().clamp_min(ALPHA_FLOOR)
                total = (grad_y.float() * y.float()).sum() / a
            else:
                inside_w, above_w = _alpha_grad_weights(ctx.alpha_grad, ctx.bits)
                total = sums[1] * above_w
                if inside_w:  # "pact" ignores the inside region: even a non-finite sum there
                    total = total + sums[0] * inside_w
                total = total.float()
            grad_alpha = (total * ctx.alpha_lr_scale).clamp(-1.0, 1.0).to(alpha.dtype)
        return grad_x, grad_alpha, None, None, None, None, None


def check_quantized_relu_args(
    bits: object, ste: object, alpha_grad: object, alpha_lr_scale: object, rounding: object
):
    """Validate the settings of :func:`quantized_relu`; ``ValueError`` naming the argument otherwise."""
    check_bits(bits)
    _ste.get(ste)  # type: ignore[arg-type]
    check_choice("alpha_grad", alpha_grad, ALPHA_GRADS)
    check_choice("rounding", rounding, ROUNDINGS)
    if (
        isinstance(alpha_lr_scale, bool)
        or not isinstance(alpha_lr_scale, (int, float))
        or not (math.isfinite(alpha_lr_scale) and alpha_lr_scale >= 0)
    ):
        raise ValueError(f"`alpha_lr_scale` must be a finite number >= 0, got {alpha_lr_scale!r}")


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
    STE ``ste`` (see :mod:`lightning_ste.ste`); backward to ``alpha`` is
    ``clamp(alpha_lr_scale * sum(grad * d~sigma/d alpha), -1, 1)`` with the ``alpha_grad`` proxy.

    Runs on the backend :func:`lightning_ste.kernels.backend_for` picks (``LIGHTNING_STE_KERNELS``): the
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


# ------------------------------------------------------------------------------------------------ weights


def _reduce_dims(w: Tensor, per_channel: bool) -> tuple[int, ...] | None:
    return tuple(range(1, w.dim())) if per_channel and w.dim() > 1 else None


def _mean(t: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    return t.mean() if dims is None else t.mean(dim=dims, keepdim=True)


def _sum(t: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    return t.sum() if dims is None else t.sum(dim=dims, keepdim=True)


def _amax(t: Tensor, dims: tuple[int, ...] | None) -> Tensor:
    return t.amax() if dims is None else t.amax(dim=dims, keepdim=True)


def weight_codes(
    w: Tensor,
    bits: int,
    per_channel: bool = False,
    ternary_scale: str = "twn",
    binary_scale: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Integer codes and scale of the docs/math.md §2 weight quantizer: ``q(W) = scale * codes`` (BCGD19).

    ``codes`` holds signed integers (as ``w``'s dtype) in ``{-(2**(b-1)-1), ..., 2**(b-1)-1}`` (``{-1, 0, 1}``
    for bits 1 and 2); ``scale`` is a scalar, or one value per output channel (shape ``[C, 1, ...]``).
    """
    dims = _reduce_dims(w, per_channel)
    if bits == 1 and binary_scale == "mean" and dims is None:
        if _kernels.weights_usable(w):
            return torch.sign(w), _kernels.abs_mean(w)  # one read instead of |W| then its mean
        if not torch.compiler.is_compiling():
            # The scale WeightQuantizer's device path computes, to the last bit (export and summary match it).
            return torch.sign(w), binary_mean_scales([w])[0]
    mag = w.abs()
    sign = torch.sign(w)  # sign(0) = 0, as in the BCGD19 code
    if bits == 1:
        if binary_scale == "mean":
            scale = _mean(mag, dims)
        elif dims is None:
            scale = mag.flatten().median() if mag.numel() else mag.sum()
        else:
            scale = mag.flatten(1).median(dim=1).values.view(-1, *([1] * (w.dim() - 1)))
        if binary_scale == "median" and mag.numel():
            # median|W| ignores a single +-inf; make the scale non-finite then, as the mean is.
            scale = scale + _amax(mag, dims) * 0
        return sign, scale
    if bits == 2:
        # TWN: threshold 0.7 mean|W|, scale = mean |W| over the kept weights (or over all, BCGD19 code).
        keep = mag >= 0.7 * _mean(mag, dims)
        kept_sum = _sum(mag * keep, dims)
        if ternary_scale == "twn":
            scale = kept_sum / _sum(keep.to(w.dtype), dims).clamp_min(1)
        else:
            count = mag.numel() if dims is None else math.prod(mag.shape[1:])
            scale = kept_sum / max(count, 1)
        return sign * keep, scale
    top = 2 ** (bits - 1) - 1
    delta = _amax(mag, dims) / (2 * top + 1)
    # c = k for (2k-1) delta < |W| <= (2k+1) delta, 0 below delta, capped at top (BCGD19 code, any b).
    codes = torch.div(mag - delta, 2 * delta).ceil_().clamp_(0, top).nan_to_num_(0.0)
    scale = _sum(mag * codes, dims) / _sum(codes * codes, dims).clamp_min(1)
    return sign * codes, scale


def quantize_weight(
    w: Tensor,
    bits: int,
    per_channel: bool = False,
    ternary_scale: str = "twn",
    binary_scale: str = "mean",
    out: Tensor | None = None,
) -> Tensor:
    """Quantized weights q(W) (docs/math.md §2, BCGD19): binary (bits=1), ternary TWN (2), symmetric b-bit (>=3).

    The gradient reaches ``w`` straight through (identity), as the coarse gradient of BCGD19 needs.
    ``out``: a tensor like ``w`` to write q(W) into instead of allocating one (the result aliases it).
    """
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"`w` must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    check_bits(bits)
    check_choice("ternary_scale", ternary_scale, TERNARY_SCALES)
    check_choice("binary_scale", binary_scale, BINARY_SCALES)
    with torch.no_grad():
        wd = w.detach()
        if one_pass_binary(wd, bits, per_channel, binary_scale):
            q, _ = one_pass_binary_weight(wd, out)
        else:
            codes, scale = weight_codes(wd, bits, per_channel, ternary_scale, binary_scale)
            q = torch.mul(codes, scale, out=out)
    return straight_through(w, q)


def one_pass_binary(w: Tensor, bits: int, per_channel: bool, binary_scale: str) -> bool:
    """Whether q(W) = sign(W)·mean|W| runs on the fused CPU kernels (binary, mean scale, per tensor)."""
    return bits == 1 and binary_scale == "mean" and not per_channel and _kernels.weights_usable(w)


def one_pass_binary_weight(w: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(sign(W)·mean|W|, mean|W|)`` on the fused kernels, where :func:`one_pass_binary` holds: two passes
    over W instead of four; no autograd."""
    scale = _kernels.abs_mean(w)
    return _kernels.sign_scale(w, scale, out), scale


def binary_weight_multi(ws: Sequence[Tensor]) -> list[Tensor]:
    """``sign(W) * ||W||_1 / n`` (binary q(W) with the mean-|W| scale, BCGD19) for every ``W`` of ``ws``, no
    autograd: the scales in two multi-tensor (foreach) ops and the signs in one, however many tensors, then one
    multiply per tensor. The device path of binary per-tensor weights, one tensor or many: the same values."""
    ws = list(ws)
    with torch.no_grad():
        qs = torch._foreach_sign(ws)
        torch._foreach_mul_(qs, binary_mean_scales(ws))
    return qs


def binary_mean_scales(ws: Sequence[Tensor]) -> list[Tensor]:
    """``||W||_1 / n`` (mean|W|, the binary scale of BCGD19) of every ``W`` in two multi-tensor ops, no autograd."""
    with torch.no_grad():
        scales = torch._foreach_norm(list(ws), 1)
        torch._foreach_div_(scales, [float(max(w.numel(), 1)) for w in ws])
    return list(scales)


def straight_through(w: Tensor, q: Tensor) -> Tensor:
    """``q`` in the forward, the gradient passed to ``w`` unchanged in the backward (BCGD19 coarse gradient)."""
    return _StraightThrough.apply(w, q)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``q``; backward passes the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor) -> Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


# ------------------------------------------------------------------------------------- resolution


def _phi(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2))) if math.isfinite(x) else (1.0 if x > 0 else 0.0)


def _second_moment(t: float) -> float:
    """Antiderivative of x^2 phi(x): Phi(t) - t phi(t)."""
    return _cdf(t) - t * _phi(t) if math.isfinite(t) else _cdf(t)


def _interval_sq_error(lo: float, hi: float, c: float) -> float:
    """Integral of (x - c)^2 phi(x) over (lo, hi], in closed form."""
    m0 = _cdf(hi) - _cdf(lo)
    m1 = _phi(lo) - _phi(hi)
    m2 = _second_moment(hi) - _second_moment(lo)
    return m2 - 2 * c * m1 + c * c * m0


def _half_gaussian_mse(alpha: float, bits: int, rounding: str) -> float:
    levels = 2**bits - 1
    total = 0.0
    for k in range(levels + 1):
        if rounding == "nearest":
            lo = 0.0 if k == 0 else (k - 0.5) * alpha
            hi = math.inf if k == levels else (k + 0.5) * alpha
        else:
            if k == 0:
                continue  # x <= 0 carries no half-Gaussian mass
            lo = (k - 1) * alpha
            hi = math.inf if k == levels else k * alpha
        total += _interval_sq_error(lo, hi, k * alpha)
    return 2.0 * total  # half-Gaussian density is 2 phi on x > 0


# The papers' constants (YLZ19 Table 1 setting; BCGD19 code `bit_alpha`). The exact optima of the closed
# form below are 1.2240 (b=1), 0.6508 (b=2) and 0.1932 (b=4): the MSE curve is so flat there that the two
# differ by < 1e-5 in MSE, and the published values are kept so the recipes reproduce the papers.
_PUBLISHED_RESOLUTION = {(1, "nearest"): 1.2221, (2, "nearest"): 0.6511, (4, "nearest"): 0.1946}


@cache
def half_gaussian_resolution(bits: int, rounding: str = "nearest") -> float:
    """MSE-optimal step alpha of the b-bit quantized ReLU for unit half-Gaussian input (docs/math.md §1.3; YLZ19).

    ``argmin_alpha E[(x - sigma(x))^2]``, ``x ~ |N(0, 1)|``: 1.2221 (b=1), 0.6511 (b=2), 0.1946 (b=4) with
    nearest rounding (the papers' values); other cases in closed form per interval, minimised by
    golden-section search. The quantizers start from the nearest-rounding value whatever their own rounding,
    as the papers' code does with its ceil quantizer (docs/math.md §1.3); the ceil optimum is smaller (0.4866, b=2).
    """
    check_bits(bits)
    check_choice("rounding", rounding, ROUNDINGS)
    if (bits, rounding) in _PUBLISHED_RESOLUTION:
        return _PUBLISHED_RESOLUTION[(bits, rounding)]
    levels = 2**bits - 1
    # Bracket: the top level L*alpha lies between 0.5 and 8 standard deviations for every b.
    grid = [0.5 / levels * (16 ** (i / 200)) for i in range(201)]
    values = [_half_gaussian_mse(a, bits, rounding) for a in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    inv_phi = (math.sqrt(5) - 1) / 2
    for _ in range(100):
        c = hi - inv_phi * (hi - lo)
        d = lo + inv_phi * (hi - lo)
        if _half_gaussian_mse(c, bits, rounding) < _half_gaussian_mse(d, bits, rounding):
            hi = d
        else:
            lo = c
    return (lo + hi) / 2
