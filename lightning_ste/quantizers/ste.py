"""Registry of straight-through estimators: name -> proxy derivative mu'(x) of the quantized ReLU.

A proxy derivative is a function ``fn(x, top) -> Tensor`` of the pre-activation ``x`` and the top
level ``top = L * alpha`` (both tensors, broadcastable). LYX21 proves convergence for proxies with
"certain monotonicity": mu is non-decreasing (mu' >= 0) and mu(x) = 0 for x <= 0, so mu' = 0 there.
:func:`register` checks those conditions on a probe grid and refuses a proxy that fails them unless
``allow_non_monotone=True``.

A proxy that is constant on the three regions ``x <= 0``, ``0 < x <= top`` and ``x > top`` can be
registered with ``regions=(m0, m1, m2)``: backward then needs only a one-byte region code per element
instead of a copy of the input (the built-ins ``identity``, ``relu`` and ``clipped_relu`` do this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["STE", "available", "get", "register"]

ProxyDerivative = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class STE:
    """A registered straight-through estimator."""

    name: str
    derivative: ProxyDerivative
    regions: tuple[float, float, float] | None
    monotone: bool


_REGISTRY: dict[str, STE] = {}

# Probe grid for the LYX21 conditions: several top levels, points on both sides of 0 and of top.
_PROBE_TOPS = (0.05, 0.5, 1.0, 3.0, 15.0)


def _probe(fn: ProxyDerivative) -> tuple[bool, str]:
    """Check mu' >= 0 everywhere and mu' = 0 on x <= 0 on a probe grid; return (ok, reason)."""
    for top in _PROBE_TOPS:
        x = torch.cat([torch.linspace(-4.0 * top - 1, 4.0 * top + 1, 401, dtype=torch.float64)])
        x = torch.cat([x, torch.tensor([0.0, top, -1e-6, 1e-6], dtype=torch.float64)])
        t = torch.tensor(top, dtype=torch.float64)
        d = fn(x, t)
        if not isinstance(d, Tensor):
            return False, f"returned {type(d).__name__}, expected a Tensor"
        d = torch.broadcast_to(d, x.shape).to(torch.float64)
        if not bool(torch.isfinite(d).all()):
            return False, f"is not finite on the probe grid (top={top})"
        if bool((d < 0).any()):
            bad = float(x[d < 0][0])
            return False, f"is negative at x={bad:g} (top={top}); LYX21 needs mu' >= 0"
        if bool((d[x <= 0] != 0).any()):
            bad = float(x[(x <= 0) & (d != 0)][0])
            return False, f"is non-zero at x={bad:g} <= 0 (top={top}); LYX21 needs mu(x) = 0 for x <= 0"
    return True, ""


def _regions_match(fn: ProxyDerivative, regions: tuple[float, float, float]) -> bool:
    for top in _PROBE_TOPS:
        x = torch.linspace(-4.0 * top - 1, 4.0 * top + 1, 401, dtype=torch.float64)
        x = torch.cat([x, torch.tensor([0.0, top], dtype=torch.float64)])
        t = torch.tensor(top, dtype=torch.float64)
        expected = torch.where(x <= 0, regions[0], torch.where(x <= t, regions[1], regions[2])).to(
            torch.float64
        )
        if not torch.equal(torch.broadcast_to(fn(x, t), x.shape).to(torch.float64), expected):
            return False
    return True


def register(
    name: str,
    fn: ProxyDerivative,
    *,
    regions: tuple[float, float, float] | None = None,
    allow_non_monotone: bool = False,
    overwrite: bool = False,
) -> ProxyDerivative:
    """Register proxy derivative ``fn(x, top)`` under ``name`` after checking the LYX21 monotone conditions.

    Raises ``ValueError`` when the name is taken (unless ``overwrite``), when ``regions`` does not agree
    with ``fn``, or when ``fn`` is negative somewhere or non-zero on ``x <= 0`` (unless
    ``allow_non_monotone``). Returns ``fn`` so it can be used as a decorator via ``functools.partial``.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"`name` must be a non-empty string, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"STE {name!r} is already registered; pass overwrite=True to replace it")
    if not callable(fn):
        raise ValueError(f"`fn` must be callable fn(x, top) -> Tensor, got {type(fn).__name__}")
    if regions is not None:
        given = tuple(float(r) for r in regions)
        if len(given) != 3:
            raise ValueError(f"`regions` must be 3 numbers (x<=0, 0<x<=top, x>top), got {given!r}")
        regions = (given[0], given[1], given[2])
        if not _regions_match(fn, regions):
            raise ValueError(f"`regions`={regions!r} does not agree with `fn` on the probe grid")
    monotone, reason = _probe(fn)
    if not monotone and not allow_non_monotone:
        raise ValueError(
            f"STE {name!r}: the proxy derivative {reason}. Pass allow_non_monotone=True to register it anyway."
        )
    _REGISTRY[name] = STE(name, fn, regions, monotone)
    return fn


def get(name: str) -> STE:
    """Return the registered STE ``name``; ``ValueError`` listing the names when unknown."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown `ste` {name!r}; available: {', '.join(available())}") from None


def available() -> list[str]:
    """Names of the registered STEs, sorted."""
    return sorted(_REGISTRY)


def _identity(x: Tensor, top: Tensor) -> Tensor:
    return torch.ones_like(x)


def _relu(x: Tensor, top: Tensor) -> Tensor:
    return (x > 0).to(x.dtype)


def _clipped_relu(x: Tensor, top: Tensor) -> Tensor:
    return ((x > 0) & (x <= top)).to(x.dtype)


def _log_tailed_relu(x: Tensor, top: Tensor) -> Tensor:
    # HWGQ tail 1/(x - top + 1): continuous with the clipped part at x = top. The clamp keeps the unused
    # branch of `where` finite for x far below top.
    tail = 1.0 / (x - top + 1.0).clamp_min(1.0)
    return torch.where(x > top, tail, (x > 0).to(x.dtype))


register("identity", _identity, regions=(1.0, 1.0, 1.0), allow_non_monotone=True)  # YLZ19
register("relu", _relu, regions=(0.0, 1.0, 1.0))  # YLZ19, LYX21
register("clipped_relu", _clipped_relu, regions=(0.0, 1.0, 0.0))  # YLZ19; BCGD19 code `inplt`
register("log_tailed_relu", _log_tailed_relu)  # HWGQ (Cai et al. 2017)
