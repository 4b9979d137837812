"""The BCGD step of SPEC §3 (BCGD19): blend latent weights towards their quantization, and the ρ schedule.

Pure tensor code, no Lightning: :class:`~lightning_ste.callbacks.weights.BlendedQuantWeights` calls it from
``on_before_optimizer_step``, and a plain PyTorch loop can call it the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["RhoSchedule", "bcgd_blend_", "blend_", "check_rho", "grads_finite"]

RhoScheduleArg = None | tuple[float, float] | Sequence[float] | Callable[[int], float]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rho(rho: object, name: str = "rho") -> float:
    """Validate a blending parameter: a finite number in [0, 1]."""
    if not _is_number(rho) or not math.isfinite(rho) or not 0.0 <= rho <= 1.0:  # type: ignore[arg-type]
        raise ValueError(f"`{name}` must be a number in [0, 1], got {rho!r}")
    return float(rho)  # type: ignore[arg-type]


@torch.no_grad()
def blend_(latent: Tensor, quantized: Tensor, rho: float | Tensor) -> Tensor:
    """W <- (1 - ρ) W + ρ q(W), in place, in exactly that order of operations (SPEC §3 step 2; BCGD19).

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
def bcgd_blend_(
    layers: Iterable[tuple[Tensor, Callable[[Tensor], Tensor]]], rho: float, finite: Tensor | None = None
) -> None:
    """Blend every latent ``W`` of ``layers`` ``(W, q)`` as W <- (1 - ρ) W + ρ q(W) (SPEC §3; BCGD19).

    ``q`` is a callable ``W -> q(W)``; one that also has a ``blend_(W, rho)`` method (a
    :class:`~lightning_ste.modules.WeightQuantizer`) does the blend itself, in one pass where it can.
    ``finite`` (from :func:`grads_finite`): when it is False the step is one the GradScaler skips, and the
    blend is skipped too. On the CPU it is read directly; on an accelerator ρ is multiplied by it on the
    device, so no synchronisation is needed. ``rho = 0`` (BinaryConnect) does nothing, not even computing q(W).
    """
    if rho == 0.0:
        return
    if finite is not None and finite.device.type == "cpu":
        if not bool(finite):
            return
        finite = None
    weights: dict[tuple[torch.device, torch.dtype], Tensor | float] = {}
    for latent, quantize in layers:
        key = (latent.device, latent.dtype)
        if key not in weights:
            weights[key] = (
                rho if finite is None else finite.to(device=latent.device, dtype=latent.dtype) * rho
            )
        fused = getattr(quantize, "blend_", None)
        if fused is not None:
            fused(latent, weights[key])
        else:
            blend_(latent, quantize(latent), weights[key])


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
        elif self.rate is not None and epoch > self.epoch:
            for _ in range(epoch - self.epoch):
                self.rho = min(self.rho * self.rate, self.max)  # type: ignore[type-var]
        self.epoch = max(self.epoch, epoch)
        return self.rho

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only the (rate, max) recurrence depends on the past; a constant ρ comes from the constructor, so a
        # run resumed with another `rho` uses it.
        self.epoch = int(state.get("epoch", -1))
        if self.rate is not None:
            self.rho = check_rho(state.get("rho", self.initial))

    def __repr__(self) -> str:
        if self.fn is not None:
            return f"RhoSchedule(callable {getattr(self.fn, '__name__', self.fn)!s})"
        if self.rate is not None:
            return f"RhoSchedule(rho={self.initial:g}, rate={self.rate:g}, max={self.max:g})"
        return f"RhoSchedule(rho={self.initial:g})"
