"""A float64 oracle of the quantized ReLU, written from its definition, independent of lightning_ste.

Forward (b bits, L = 2**b - 1, a = max(alpha, 1e-3)):
    y = a * clamp(ceil(x / a), 0, L)            (rounding="ceil")
    y = a * clamp(round_half_even(x / a), 0, L)  (rounding="nearest")
    y = x where x = +-inf; NaN stays NaN.
Region of x: 0 for x <= 0 (and NaN), 1 for 0 < x <= L*a, 2 for x > L*a.
Backward to x: grad * mu'(x) with the STE's proxy derivative mu':
    identity 1; relu [x > 0]; clipped_relu [0 < x <= L*a];
    log_tailed_relu 1/max(x - L*a + 1, 1) for x > L*a, [x > 0] below (HWGQ).
Backward to alpha: clamp(scale * S, -1, 1), where (BCGD19) S = sum(grad * y) / a for "ae" and
    S = L * sum_{x > L*a} grad + w * sum_{0 < x <= L*a} grad,  w = 2**(b-1) ("mean"), 1 ("min"), 0 ("pact").

Precision model (what the package promises): half-precision inputs are computed in float32 (float64 inputs
in float64) and each result is rounded once to the input's dtype; the backward reads alpha in float32.
Every float32 operation is reproduced here exactly: the operands are float32 values, the operation is done in
float64 and rounded once to float32 (exact for +, -, *, / of float32 operands, since 53 >= 2*24 + 2).
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOOR = 1e-3
STES = ("identity", "relu", "clipped_relu", "log_tailed_relu")
ALPHA_GRADS = ("ae", "mean", "min", "pact")
_REGION_MULTIPLIERS = {"identity": (1.0, 1.0, 1.0), "relu": (0.0, 1.0, 1.0), "clipped_relu": (0.0, 1.0, 0.0)}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fl(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 values once to ``dtype`` (round to nearest even) and return them as float64."""
    return t.to(dtype).to(torch.float64)


def _step(alpha: float | Tensor, dtype: torch.dtype) -> Tensor:
    """a = max(alpha, 1e-3) in ``dtype`` (NaN stays NaN), as a float64 0-dim tensor."""
    a = _fl(torch.as_tensor(alpha).to(torch.float64), dtype)  # a Python float is a float32 parameter
    floor = _fl(torch.tensor(FLOOR, dtype=torch.float64), dtype)
    return torch.where(a < floor, floor, a)


def _round_half_even(q: Tensor) -> Tensor:
    f = torch.floor(q)
    d = q - f
    odd = torch.remainder(f, 2) == 1
    r = torch.where(d > 0.5, f + 1, torch.where(d < 0.5, f, torch.where(odd, f + 1, f)))
    r = torch.where(torch.isfinite(q), r, q)
    return torch.copysign(r, q)  # round(-0.2) = -0.0


def forward(x: Tensor, alpha: float | Tensor, bits: int, rounding: str = "ceil") -> Tensor:
    """y in x's dtype."""
    c = _compute_dtype(x.dtype)
    xd = x.detach().to(torch.float64)  # exact
    a = _step(alpha, c)
    levels = float(2**bits - 1)
    q = _fl(xd / a, c)
    k = torch.ceil(q) if rounding == "ceil" else _round_half_even(q)
    k = torch.where(k < 0, torch.zeros_like(k), k)  # -0.0 stays -0.0, NaN stays NaN
    k = torch.where(k > levels, torch.full_like(k, levels), k)
    y = _fl(k * a, c)
    y = torch.where(torch.isinf(xd), xd, y)
    return y.to(x.dtype)


def region(x: Tensor, alpha: float | Tensor, bits: int, backward: bool = False) -> Tensor:
    """0 (x <= 0 or NaN), 1 (0 < x <= L*a), 2 (x > L*a) as uint8; ``backward``: a read in float32."""
    c = _compute_dtype(x.dtype)
    xd = x.detach().to(torch.float64)
    a = _fl(_step(alpha, torch.float32), c) if backward else _step(alpha, c)
    top = _fl(a * float(2**bits - 1), c)
    return (xd > 0).to(torch.uint8) + (xd > top).to(torch.uint8)


def grad_x(x: Tensor, grad: Tensor, alpha: float | Tensor, bits: int, ste: str) -> Tensor:
    """grad * mu'(x) in grad's dtype."""
    g = grad.detach().to(torch.float64)
    if ste in _REGION_MULTIPLIERS:
        m = torch.tensor(_REGION_MULTIPLIERS[ste], dtype=torch.float64)[region(x, alpha, bits).long()]
        return (g * m).to(grad.dtype)
    if ste != "log_tailed_relu":
        raise ValueError(f"unknown ste {ste!r}; the reference knows {', '.join(STES)}")
    c = _compute_dtype(x.dtype)
    xd = x.detach().to(torch.float64)
    a = _fl(_step(alpha, torch.float32), c)
    top = _fl(a * float(2**bits - 1), c)
    t = _fl(_fl(xd - top, c) + 1.0, c)
    t = torch.where(t < 1.0, torch.ones_like(t), t)  # NaN stays NaN
    tail = _fl(1.0 / t, c)
    d = torch.where(xd > top, tail, (xd > 0).to(torch.float64))
    d = _fl(d, grad.dtype)
    return (g * d).to(grad.dtype)


def alpha_terms(
    x: Tensor, grad: Tensor, alpha: float | Tensor, bits: int, alpha_grad: str, rounding: str = "ceil"
) -> Tensor:
    """The summands of S (before the sum, the scale and the clamp), float64, one per element."""
    g = grad.detach().to(torch.float64)
    levels = float(2**bits - 1)
    if alpha_grad == "ae":
        a = _step(alpha, torch.float32)
        return g * forward(x, alpha, bits, rounding).to(torch.float64) / a
    weights = {"mean": float(2 ** (bits - 1)), "min": 1.0, "pact": 0.0}
    if alpha_grad not in weights:
        raise ValueError(f"unknown alpha_grad {alpha_grad!r}; the reference knows {', '.join(ALPHA_GRADS)}")
    code = region(x, alpha, bits)
    above = torch.where(code == 2, g, torch.zeros_like(g)) * levels
    if weights[alpha_grad] == 0.0:
        return above
    return above + torch.where(code == 1, g, torch.zeros_like(g)) * weights[alpha_grad]


def grad_alpha(
    x: Tensor,
    grad: Tensor,
    alpha: float | Tensor,
    bits: int,
    alpha_grad: str,
    alpha_lr_scale: float = 0.01,
    rounding: str = "ceil",
) -> Tensor:
    """clamp(alpha_lr_scale * S, -1, 1), float64 0-dim."""
    total = alpha_terms(x, grad, alpha, bits, alpha_grad, rounding).sum() * alpha_lr_scale
    return torch.where(total.abs() > 1, total.sign(), total)


def assert_same_bits(got: Tensor, expected: Tensor, signed_zero: bool = True, what: str = "") -> None:
    """Equal dtype, shape and values bit for bit (any NaN payload matches NaN); ``signed_zero=False``
    also lets -0.0 match 0.0."""
    assert got.dtype == expected.dtype and got.shape == expected.shape, (what, got.dtype, expected.dtype)
    nan_g, nan_e = torch.isnan(got), torch.isnan(expected)
    assert torch.equal(nan_g, nan_e), f"{what}: NaN at different elements"
    g, e = got[~nan_g], expected[~nan_e]
    if signed_zero:
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
        bad = g.contiguous().view(bits) != e.contiguous().view(bits)
    else:
        bad = g != e
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} elements differ, first {g[i].item()!r} vs {e[i].item()!r}"
        )


def assert_close_alpha(
    got: Tensor, terms: Tensor, alpha_lr_scale: float, rtol: float = 2e-5, what: str = ""
) -> None:
    """``got`` (an alpha gradient) equals clamp(scale * sum(terms), -1, 1) up to float32 summation error."""
    total = terms.sum() * alpha_lr_scale
    expected = torch.where(total.abs() > 1, total.sign(), total)
    value = float(got)
    if torch.isnan(expected):
        assert value != value, f"{what}: alpha gradient {value} where the reference is NaN"
        return
    tol = rtol * float(terms.abs().sum()) * alpha_lr_scale + 1e-12
    assert abs(value - float(expected)) <= tol, f"{what}: {value} vs {float(expected)} (tolerance {tol:.3g})"
