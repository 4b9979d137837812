"""The MSE-optimal resolution alpha of the b-bit quantized ReLU for a unit half-Gaussian input (YLZ19).

docs/math.md §1.3: the starting value of a learned or fixed alpha. Closed form per interval, plain Python floats.
"""

from __future__ import annotations

import math
from functools import cache

from lightning_ste.config import ROUNDINGS, check_bits, check_choice

__all__ = ["half_gaussian_resolution"]


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
