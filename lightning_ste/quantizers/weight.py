"""Weight quantizers q(W) (docs/math.md §2; BCGD19): binary, ternary (TWN) and symmetric b-bit codes and scales,
the straight-through parametrization :class:`WeightQuantizer`, and the multi-tensor binary path.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ste._compat import (
    foreach_div_,
    foreach_mul_,
    foreach_norm,
    foreach_sign,
    storage_use_count,
    tensor_version,
)
from lightning_ste.blend import blend_
from lightning_ste.config import BINARY_SCALES, TERNARY_SCALES, check_bits, check_choice
from lightning_ste.kernels import cpu as cpu_kernels

__all__ = [
    "WeightQuantizer",
    "binary_mean_scales",
    "binary_weight_multi",
    "one_pass_binary",
    "one_pass_binary_weight",
    "prepare_weights_",
    "quantize_weight",
    "straight_through",
    "weight_codes",
]

# References to an idle storage: the tensor that owns it and the UntypedStorage object that asks.
_IDLE_USE_COUNT = 2
# Whether this torch reports them at all (without the count, q(W) storage is never reused).
_COUNTS_STORAGE = storage_use_count(torch.empty(0)) is not None


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
        if cpu_kernels.weights_usable(w):
            return torch.sign(w), cpu_kernels.abs_mean(w)  # one read instead of |W| then its mean
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
    return bits == 1 and binary_scale == "mean" and not per_channel and cpu_kernels.weights_usable(w)


def one_pass_binary_weight(w: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(sign(W)·mean|W|, mean|W|)`` on the fused kernels, where :func:`one_pass_binary` holds: two passes
    over W instead of four; no autograd."""
    scale = cpu_kernels.abs_mean(w)
    return cpu_kernels.sign_scale(w, scale, out), scale


def binary_weight_multi(ws: Sequence[Tensor]) -> list[Tensor]:
    """``sign(W) * ||W||_1 / n`` (binary q(W) with the mean-|W| scale, BCGD19) for every ``W`` of ``ws``, no
    autograd: the scales in two multi-tensor (foreach) ops and the signs in one, however many tensors, then one
    multiply per tensor. The device path of binary per-tensor weights, one tensor or many: the same values."""
    ws = list(ws)
    with torch.no_grad():
        qs = foreach_sign(ws)
        foreach_mul_(qs, binary_mean_scales(ws))
    return qs


def binary_mean_scales(ws: Sequence[Tensor]) -> list[Tensor]:
    """``||W||_1 / n`` (mean|W|, the binary scale of BCGD19) of every ``W`` in two multi-tensor ops, no autograd."""
    with torch.no_grad():
        scales = foreach_norm(ws, 1)
        foreach_div_(scales, [float(max(w.numel(), 1)) for w in ws])
    return scales


def straight_through(w: Tensor, q: Tensor) -> Tensor:
    """``q`` in the forward, the gradient passed to ``w`` unchanged in the backward (BCGD19 coarse gradient)."""
    return _StraightThrough.apply(w, q)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``q``; backward passes the gradient to ``w`` unchanged."""

    @staticmethod
    def forward(ctx, w: Tensor, q: Tensor) -> Tensor:
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _kept_for(entry: tuple[weakref.ref, int, Tensor] | None, w: Tensor) -> Tensor | None:
    """The tensor kept in ``entry`` for ``w`` if ``w`` is that same tensor, unchanged since (same version)."""
    return entry[2] if entry is not None and entry[0]() is w and entry[1] == tensor_version(w) else None


class WeightQuantizer(nn.Module):
    """Parametrization ``W -> q(W)`` of docs/math.md §2 with a straight-through gradient to ``W`` (BCGD19)."""

    def __init__(
        self, bits: int = 1, per_channel: bool = False, ternary_scale: str = "twn", binary_scale: str = "mean"
    ) -> None:
        super().__init__()
        check_bits(bits)
        check_choice("ternary_scale", ternary_scale, TERNARY_SCALES)
        check_choice("binary_scale", binary_scale, BINARY_SCALES)
        if not isinstance(per_channel, bool):
            raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}")
        self.bits, self.per_channel = bits, per_channel
        self.ternary_scale, self.binary_scale = ternary_scale, binary_scale
        self._out: Tensor | None = None
        self._scale: tuple[weakref.ref, int, Tensor] | None = None  # (W, its version, mean|W|), last forward
        self._q: tuple[weakref.ref, int, Tensor] | None = (
            None  # (W, its version, q(W)), last training forward
        )

    def forward(self, w: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # A traced graph computes q(W) itself (no Python-side cache to guard on); nothing is kept for a blend.
            return quantize_weight(w, self.bits, self.per_channel, self.ternary_scale, self.binary_scale)
        known = _kept_for(self._q, w)
        if known is not None:
            # q(W) of this same, unchanged W: prepared for this step by prepare_weights_, or an earlier forward
            return straight_through(w, known)
        self._q = None  # the last forward's q(W) (its storage may be reused below)
        out = self._free_out(w)
        if one_pass_binary(w, self.bits, self.per_channel, self.binary_scale):
            with torch.no_grad():
                q, scale = one_pass_binary_weight(w.detach(), out)
            # The BCGD blend of this same W (unchanged since: same version) reuses mean|W|, saving a read of W.
            # (Inference tensors have no version and are never trained.)
            self._scale = None if w.is_inference() else (weakref.ref(w), tensor_version(w), scale)
            return straight_through(w, q)
        with torch.no_grad():
            if self.multi_binary(w):
                (q,) = binary_weight_multi([w.detach()])
            else:
                codes, scale = weight_codes(
                    w.detach(), self.bits, self.per_channel, self.ternary_scale, self.binary_scale
                )
                q = torch.mul(codes, scale, out=out)
        if torch.is_grad_enabled() and w.requires_grad and not w.is_inference():
            # The blend before this step's optimizer update sees the same W (same version) and takes this q(W)
            # instead of computing it again (on CUDA: no kernel launches for q in the blend).
            self._q = (weakref.ref(w), tensor_version(w), q)
        return straight_through(w, q)

    def multi_binary(self, w: Tensor) -> bool:
        """Whether q(W) is :func:`binary_weight_multi` (binary, mean scale, per tensor,
        without the fused CPU kernels: the CUDA path), which :func:`prepare_weights_` computes for many layers."""
        return (
            self.bits == 1
            and self.binary_scale == "mean"
            and not self.per_channel
            and not one_pass_binary(w, self.bits, self.per_channel, self.binary_scale)
        )

    def for_blend(self, w: Tensor) -> Tensor:
        """q(W) for the BCGD blend: the last training forward's when ``w`` is the same tensor, unchanged since
        (same version counter); else computed now. The same values either way."""
        known, self._q = _kept_for(self._q, w), None
        return known if known is not None else self.quantize(w)

    def fused_blend_(self, w: Tensor, rho: float | Tensor) -> bool:
        """Blend ``w`` in place in one pass when the fused CPU kernels handle it (binary, mean scale, per
        tensor, ``rho`` a number); False (nothing done) otherwise."""
        if isinstance(rho, Tensor) or not one_pass_binary(w, self.bits, self.per_channel, self.binary_scale):
            return False
        scale, self._scale = _kept_for(self._scale, w), None  # W changes now
        cpu_kernels.binary_blend_(w, rho, scale)
        return True

    def _free_out(self, w: Tensor) -> Tensor | None:
        """Last forward's q(W) storage when nothing holds it any more (its backward has run), else a new one.

        On the CPU a fresh q(W) per step costs page faults as large as the write itself; reusing the
        storage only once no graph or caller references it keeps every returned q(W) intact.
        """
        if w.device.type != "cpu" or not _COUNTS_STORAGE or torch.compiler.is_compiling():
            return None
        out = self._out
        if (
            out is None
            or out.shape != w.shape
            or out.dtype != w.dtype
            or out.stride() != w.stride()
            or (storage_use_count(out) or 0) > _IDLE_USE_COUNT  # an int: _COUNTS_STORAGE
        ):
            out = self._out = torch.empty_like(w)
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_out"] = state["_scale"] = state["_q"] = None  # scratch: not copied, pickled or checkpointed
        return state

    @torch.no_grad()
    def quantize(self, w: Tensor) -> Tensor:
        """q(W) without autograd, for the BCGD blend (the same values the forward uses)."""
        if self.multi_binary(w):
            return binary_weight_multi([w.detach()])[0]
        return quantize_weight(w, self.bits, self.per_channel, self.ternary_scale, self.binary_scale)

    @torch.no_grad()
    def weight_codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """``(codes, scale)`` with ``codes * scale == q(W)`` in W's layout: what packed export stores."""
        return weight_codes(w, self.bits, self.per_channel, self.ternary_scale, self.binary_scale)

    @torch.no_grad()
    def blend_(self, w: Tensor, rho: float | Tensor) -> Tensor:
        """W <- (1 - ρ) W + ρ q(W) in place (BCGD19), the values of :func:`~lightning_ste.blend.blend_`.

        Binary mean-scaled per-tensor weights on the CPU take one fused pass (the blend is memory-bound and
        otherwise reads W six times); otherwise q(W) is the last forward's (:meth:`for_blend`) and is blended.
        """
        if self.fused_blend_(w, rho):
            return w
        return blend_(w, self.for_blend(w), rho)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, ternary_scale={self.ternary_scale}"


@torch.no_grad()
def prepare_weights_(pairs: Iterable[tuple[WeightQuantizer, Tensor]]) -> None:
    """q(W) of every ``(quantizer, W)`` whose quantizer takes the multi-tensor binary path, computed together
    (a few foreach ops, see :func:`binary_weight_multi`) and kept by each quantizer:
    the forwards that follow while W is unchanged take it without another pass. Others are left alone.

    Called before each training step's forward (``BlendedQuantWeights.on_train_batch_start``).
    """
    groups: dict[tuple[torch.device, torch.dtype], list[tuple[WeightQuantizer, Tensor]]] = {}
    for quantizer, w in pairs:
        if not w.requires_grad or w.is_inference() or not quantizer.multi_binary(w):
            continue
        if _kept_for(quantizer._q, w) is not None:
            continue  # already prepared for this W (another micro-batch of the same optimizer step)
        groups.setdefault((w.device, w.dtype), []).append((quantizer, w))
    for group in groups.values():
        unique = list({id(w): w for _, w in group}.values())  # a tied W once
        qs = dict(zip(map(id, unique), binary_weight_multi(unique)))
        for quantizer, w in group:
            quantizer._q = (weakref.ref(w), tensor_version(w), qs[id(w)])
