"""Modules: thin shells that hold the state of one quantizer and call :mod:`lightning_ste.functional`."""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ste import _kernels
from lightning_ste import functional as F_ste
from lightning_ste.blend import blend_ as blend

__all__ = ["ALPHA_MODES", "QuantReLU", "WeightQuantizer", "prepare_weights_"]

ALPHA_MODES = ("learned", "fixed", "calibrate")

# References to a storage: the tensor that owns it and the UntypedStorage object that asks.
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)
_IDLE_USE_COUNT = 2


def _kept_for(entry: tuple[weakref.ref, int, Tensor] | None, w: Tensor) -> Tensor | None:
    """The tensor kept in ``entry`` for ``w`` if ``w`` is that same tensor, unchanged since (same version)."""
    return entry[2] if entry is not None and entry[0]() is w and entry[1] == w._version else None


class QuantReLU(nn.Module):
    """b-bit staircase ReLU with resolution ``alpha`` and a straight-through backward (YLZ19, BCGD19).

    ``alpha_mode``: ``"learned"`` (``alpha`` is a parameter trained with the BCGD19 proxy gradient),
    ``"fixed"`` (a frozen buffer), or ``"calibrate"`` (``max|x| / L`` over the first
    ``calibration_batches`` training batches, then frozen). ``alpha=None`` starts from
    :func:`~lightning_ste.functional.half_gaussian_resolution`.
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
        F_ste.check_quantized_relu_args(bits, ste, alpha_grad, alpha_lr_scale, rounding)
        if alpha_mode not in ALPHA_MODES:
            raise ValueError(f"unknown `alpha_mode` {alpha_mode!r}; allowed: {', '.join(ALPHA_MODES)}")
        if alpha is None:
            alpha = F_ste.half_gaussian_resolution(bits)
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not 0 < float(alpha) < float("inf")
        ):
            raise ValueError(f"`alpha` must be a finite number > 0, got {alpha!r}")
        if (
            isinstance(calibration_batches, bool)
            or not isinstance(calibration_batches, int)
            or calibration_batches < 1
        ):
            raise ValueError(f"`calibration_batches` must be an int >= 1, got {calibration_batches!r}")
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
        return F_ste.quantized_relu_unchecked(
            x, self.alpha, self.bits, self.ste, self.alpha_grad, self.alpha_lr_scale, self.rounding
        )

    @torch.no_grad()
    def _calibrate(self, x: Tensor) -> None:
        # Running max over the calibration batches, stored as alpha = max|x| / L (BCGD19 code).
        estimate = x.detach().abs().amax().float() / self.levels
        if self.calibrated_batches:
            estimate = torch.maximum(estimate, self.alpha)
        self.alpha.copy_(estimate.clamp_min(F_ste.ALPHA_FLOOR))
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


class WeightQuantizer(nn.Module):
    """Parametrization ``W -> q(W)`` of docs/math.md §2 with a straight-through gradient to ``W`` (BCGD19)."""

    def __init__(
        self, bits: int = 1, per_channel: bool = False, ternary_scale: str = "twn", binary_scale: str = "mean"
    ) -> None:
        super().__init__()
        F_ste.check_bits(bits)
        F_ste.check_choice("ternary_scale", ternary_scale, F_ste.TERNARY_SCALES)
        F_ste.check_choice("binary_scale", binary_scale, F_ste.BINARY_SCALES)
        if not isinstance(per_channel, bool):
            raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}")
        self.bits, self.per_channel = bits, per_channel
        self.ternary_scale, self.binary_scale = ternary_scale, binary_scale
        self._out: Tensor | None = None
        self._scale: tuple[weakref.ref, int, Tensor] | None = None  # (W, W._version, mean|W|), last forward
        self._q: tuple[weakref.ref, int, Tensor] | None = None  # (W, W._version, q(W)), last training forward

    def forward(self, w: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            # A traced graph computes q(W) itself (no Python-side cache to guard on); nothing is kept for a blend.
            return F_ste.quantize_weight(
                w, self.bits, self.per_channel, self.ternary_scale, self.binary_scale
            )
        known = _kept_for(self._q, w)
        if known is not None:
            # q(W) of this same, unchanged W: prepared for this step by prepare_weights_, or an earlier forward
            return F_ste.straight_through(w, known)
        self._q = None  # the last forward's q(W) (its storage may be reused below)
        out = self._free_out(w)
        if F_ste.one_pass_binary(w, self.bits, self.per_channel, self.binary_scale):
            with torch.no_grad():
                q, scale = F_ste.one_pass_binary_weight(w.detach(), out)
            # The BCGD blend of this same W (unchanged since: same version) reuses mean|W|, saving a read of W.
            # (Inference tensors have no version and are never trained.)
            self._scale = None if w.is_inference() else (weakref.ref(w), w._version, scale)
            return F_ste.straight_through(w, q)
        with torch.no_grad():
            if self.multi_binary(w):
                (q,) = F_ste.binary_weight_multi([w.detach()])
            else:
                codes, scale = F_ste.weight_codes(
                    w.detach(), self.bits, self.per_channel, self.ternary_scale, self.binary_scale
                )
                q = torch.mul(codes, scale, out=out)
        if torch.is_grad_enabled() and w.requires_grad and not w.is_inference():
            # The blend before this step's optimizer update sees the same W (same version) and takes this q(W)
            # instead of computing it again (on CUDA: no kernel launches for q in the blend).
            self._q = (weakref.ref(w), w._version, q)
        return F_ste.straight_through(w, q)

    def multi_binary(self, w: Tensor) -> bool:
        """Whether q(W) is :func:`~lightning_ste.functional.binary_weight_multi` (binary, mean scale, per tensor,
        without the fused CPU kernels: the CUDA path), which :func:`prepare_weights_` computes for many layers."""
        return (
            self.bits == 1
            and self.binary_scale == "mean"
            and not self.per_channel
            and not F_ste.one_pass_binary(w, self.bits, self.per_channel, self.binary_scale)
        )

    def for_blend(self, w: Tensor) -> Tensor:
        """q(W) for the BCGD blend: the last training forward's when ``w`` is the same tensor, unchanged since
        (same version counter); else computed now. The same values either way."""
        known, self._q = _kept_for(self._q, w), None
        return known if known is not None else self.quantize(w)

    def fused_blend_(self, w: Tensor, rho: float | Tensor) -> bool:
        """Blend ``w`` in place in one pass when the fused CPU kernels handle it (binary, mean scale, per
        tensor, ``rho`` a number); False (nothing done) otherwise."""
        if isinstance(rho, Tensor) or not F_ste.one_pass_binary(
            w, self.bits, self.per_channel, self.binary_scale
        ):
            return False
        scale, self._scale = _kept_for(self._scale, w), None  # W changes now
        _kernels.binary_blend_(w, rho, scale)
        return True

    def _free_out(self, w: Tensor) -> Tensor | None:
        """Last forward's q(W) storage when nothing holds it any more (its backward has run), else a new one.

        On the CPU a fresh q(W) per step costs page faults as large as the write itself; reusing the
        storage only once no graph or caller references it keeps every returned q(W) intact.
        """
        if w.device.type != "cpu" or _storage_use_count is None or torch.compiler.is_compiling():
            return None
        out = self._out
        if (
            out is None
            or out.shape != w.shape
            or out.dtype != w.dtype
            or out.stride() != w.stride()
            or _storage_use_count(out.untyped_storage()._cdata) > _IDLE_USE_COUNT
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
            return F_ste.binary_weight_multi([w.detach()])[0]
        return F_ste.quantize_weight(w, self.bits, self.per_channel, self.ternary_scale, self.binary_scale)

    @torch.no_grad()
    def blend_(self, w: Tensor, rho: float | Tensor) -> Tensor:
        """W <- (1 - ρ) W + ρ q(W) in place (BCGD19), the values of :func:`~lightning_ste.blend.blend_`.

        Binary mean-scaled per-tensor weights on the CPU take one fused pass (the blend is memory-bound and
        otherwise reads W six times); otherwise q(W) is the last forward's (:meth:`for_blend`) and is blended.
        """
        if self.fused_blend_(w, rho):
            return w
        return blend(w, self.for_blend(w), rho)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, ternary_scale={self.ternary_scale}"


@torch.no_grad()
def prepare_weights_(pairs: Iterable[tuple[WeightQuantizer, Tensor]]) -> None:
    """q(W) of every ``(quantizer, W)`` whose quantizer takes the multi-tensor binary path, computed together
    (a few foreach ops, see :func:`~lightning_ste.functional.binary_weight_multi`) and kept by each quantizer:
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
        qs = dict(zip(map(id, unique), F_ste.binary_weight_multi(unique)))
        for quantizer, w in group:
            quantizer._q = (weakref.ref(w), w._version, qs[id(w)])
