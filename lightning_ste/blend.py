"""The BCGD step (BCGD19, docs/math.md §3): blend latent weights towards their quantization, and the ρ schedule.

Pure tensor code, no Lightning: :class:`~lightning_ste.callbacks.blended_quant_weights.BlendedQuantWeights` calls it from
``on_before_optimizer_step``, and a plain PyTorch loop can call it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor

from lightning_ste._compat import foreach_add_, foreach_mul, foreach_mul_, scaler_found_inf

__all__ = [
    "RhoSchedule",
    "bcgd_blend_",
    "blend_",
    "check_rho",
    "grads_finite",
    "multi_blend_",
    "scaler_found_inf",
]

RhoScheduleArg = None | tuple[float, float] | Sequence[float] | Callable[[int], float]


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rho(rho: object, name: str = "rho") -> float:
    """Validate a blending parameter: a finite number in [0, 1]."""
    if not _is_number(rho) or not math.isfinite(rho) or not 0.0 <= rho <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1], got {rho!r}")
    return float(rho)


@torch.no_grad()
def blend_(latent: Tensor, quantized: Tensor, rho: float | Tensor) -> Tensor:
    """W <- (1 - ρ) W + ρ q(W), in place, in exactly that order of operations (docs/math.md §3 step 2; BCGD19).

    ``rho`` may be a 0-dim tensor on ``latent``'s device, which lets the caller switch the blend off
    (``rho = 0`` leaves ``W`` unchanged) without reading a value back to the host.
    """
    if isinstance(rho, Tensor):
        rho = rho.to(device=latent.device, dtype=latent.dtype)
    return latent.mul_(1 - rho).add_(quantized.to(latent.dtype) * rho)


@torch.no_grad()
def grads_finite(params: Iterable[Tensor]) -> Tensor | None:
    """0-dim bool tensor: every gradient of ``params`` is finite (what AMP's GradScaler checks); no host sync.

    None when no parameter has a gradient.
    """
    flags = [torch.isfinite(p.grad).all() for p in params if p.grad is not None]
    if not flags:
        return None
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).all()


@torch.no_grad()
def multi_blend_(latents: Sequence[Tensor], quantized: Sequence[Tensor], rho: float | Tensor) -> None:
    """W_i <- (1 - ρ) W_i + ρ q_i for every pair, as multi-tensor (foreach) ops (BCGD19).

    Three foreach ops per (device, dtype) group however many tensors: on CUDA a handful of kernel launches
    instead of several per layer. Each element rounds exactly as :func:`blend_`
    (``W.mul_(1 - ρ).add_(q * ρ)``). A latent given more than once (a tied weight) is blended once, with its
    first ``q``. ``rho`` may be a 0-dim tensor (no host read).
    """
    if len(latents) != len(quantized):
        raise ValueError(f"`quantized` must have one tensor per latent: {len(quantized)} for {len(latents)}")
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    seen: set[int] = set()
    for w, q in zip(latents, quantized):
        if id(w) in seen:
            continue
        seen.add(id(w))
        ws, qs = groups.setdefault((w.device, w.dtype), ([], []))
        ws.append(w)
        qs.append(q if q.dtype == w.dtype else q.to(w.dtype))
    for (device, dtype), (ws, qs) in groups.items():
        r = rho.to(device=device, dtype=dtype) if isinstance(rho, Tensor) else rho
        foreach_mul_(ws, 1 - r)
        foreach_add_(ws, foreach_mul(qs, r))


@torch.no_grad()
def bcgd_blend_(
    layers: Iterable[tuple[Tensor, Callable[[Tensor], Tensor]]], rho: float, finite: Tensor | None = None
) -> None:
    """Blend every latent ``W`` of ``layers`` ``(W, q)`` as W <- (1 - ρ) W + ρ q(W) (BCGD19), each once.

    ``q`` is a callable ``W -> q(W)``. One with a ``fused_blend_(W, rho) -> bool`` method (a
    :class:`~lightning_ste.quantizers.weight.WeightQuantizer`) may blend W itself in one pass (the CPU kernels); one with a
    ``for_blend(W)`` method gives q(W) from its last forward when W is unchanged since. The rest are blended
    together with :func:`multi_blend_`. ``finite`` (from :func:`grads_finite` or ``scaler_found_inf == 0``):
    when False the step is one the GradScaler skips, and the blend is skipped too. On the CPU it is read
    directly; on an accelerator ρ is multiplied by it on the device, so no synchronisation is needed.
    ``rho = 0`` (BinaryConnect) does nothing, not even computing q(W).
    """
    if rho == 0.0:
        return
    if finite is not None and finite.device.type == "cpu":
        if not bool(finite):
            return
        finite = None
    weights: dict[tuple[torch.device, torch.dtype], Tensor | float] = {}
    latents: list[Tensor] = []
    quantized: list[Tensor] = []
    seen: set[int] = set()
    for latent, quantize in layers:
        if id(latent) in seen:  # a tied latent is blended once
            continue
        seen.add(id(latent))
        key = (latent.device, latent.dtype)
        if key not in weights:
            weights[key] = (
                rho if finite is None else finite.to(device=latent.device, dtype=latent.dtype) * rho
            )
        fused = getattr(quantize, "fused_blend_", None)
        if fused is not None and fused(latent, weights[key]):
            continue
        latents.append(latent)
        quantized.append(getattr(quantize, "for_blend", quantize)(latent))
    if finite is None:
        multi_blend_(latents, quantized, rho)
        return
    for key, weight in weights.items():  # one ρ·finite tensor per (device, dtype)
        group = [i for i, w in enumerate(latents) if (w.device, w.dtype) == key]
        multi_blend_([latents[i] for i in group], [quantized[i] for i in group], weight)


class RhoSchedule:
    """ρ per epoch (BCGD19): constant, ``(rate, max)`` with ρ <- min(ρ·rate, max) at each epoch start, or a callable.

    ``(rate, max)`` follows the BCGD19 code: the update also runs at the start of the first epoch, so epoch
    ``e`` (counted from 0) trains with ``ρ`` updated ``e + 1`` times. A callable ``epoch -> ρ`` gets the epoch
    index and must return a number in [0, 1].
    """

    def __init__(self, rho: float = 1e-5, schedule: RhoScheduleArg = None) -> None:
        self.initial = check_rho(rho)
        self.rate: float | None = None
        self.max: float | None = None
        self.fn: Callable[[int], float] | None = None
        if schedule is None:
            pass
        elif callable(schedule):
            self.fn = schedule
            self._call(0)  # a schedule that cannot produce a valid ρ fails here, before any conversion
        elif isinstance(schedule, (tuple, list)) and len(schedule) == 2 and all(map(_is_number, schedule)):
            rate, cap = (float(v) for v in schedule)
            if not (math.isfinite(rate) and rate > 0):
                raise ValueError(f"`rho_schedule` rate must be a finite number > 0, got {schedule[0]!r}")
            self.rate, self.max = rate, check_rho(cap, "rho_schedule")
        else:
            raise ValueError(
                "`rho_schedule` must be None, a (rate, max) pair of numbers or a callable epoch -> rho, "
                f"got {schedule!r}"
            )
        self.rho = self.initial
        self.epoch = -1  # last epoch whose start has been applied

    def _call(self, epoch: int) -> float:
        assert self.fn is not None
        value = self.fn(epoch)
        if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
            value = value.item()
        if not _is_number(value) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"`rho_schedule` must return a number in [0, 1], got {value!r} at epoch {epoch}")
        return float(value)

    def start_epoch(self, epoch: int) -> float:
        """Advance to the start of ``epoch`` and return its ρ; a repeated start (resumed mid-epoch) changes nothing."""
        if self.fn is not None:
            self.rho = self._call(epoch)
        elif self.rate is not None and self.max is not None and epoch > self.epoch:  # set together
            for _ in range(epoch - self.epoch):
                self.rho = min(self.rho * self.rate, self.max)
        self.epoch = max(self.epoch, epoch)
        return self.rho

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only the (rate, max) recurrence depends on the past; a constant ρ comes from the constructor, so a
        # run resumed with another `rho` uses it. Strict: a state without both keys, or with others, fails.
        if not isinstance(state, dict) or set(state) != {"rho", "epoch"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"the rho schedule state must have exactly the keys ['epoch', 'rho'], got {keys}"
            )
        self.epoch = int(state["epoch"])
        if self.rate is not None:
            self.rho = check_rho(state["rho"])

    def __repr__(self) -> str:
        if self.fn is not None:
            return f"RhoSchedule(callable {getattr(self.fn, '__name__', self.fn)!s})"
        if self.rate is not None:
            return f"RhoSchedule(rho={self.initial:g}, rate={self.rate:g}, max={self.max:g})"
        return f"RhoSchedule(rho={self.initial:g})"
