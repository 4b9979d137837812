"""The Triton kernels of the quantized ReLU (docs/math.md §1, §1.1, §1.2; YLZ19, BCGD19): one pass forward,
one pass backward, a 2-bit region code. Launched by :mod:`.triton_ops`.

Forward reads ``x`` once and writes ``y`` and a packed region code (four elements a byte: 0 for ``x <= 0``,
1 for ``0 < x <= L*alpha``, 2 for ``x > L*alpha``). Backward reads the gradient and the code (``x`` for the
input-dependent log-tailed proxy, ``y`` for ``alpha_grad="ae"``), writes ``grad * mu'(x)`` and reduces the
α gradient in the same launch: every program stores its partial sums, the last program to finish (an atomic
counter) adds them in a fixed order, so the result is deterministic. ``alpha`` is read on the device: no
host synchronisation. Every operation rounds as the eager torch formula does (IEEE division, float32
arithmetic, round-to-nearest-even casts), so values and ``grad_x`` are bit-identical to it.

The kernels work on the dense storage in memory order, so channels_last stays channels_last. Triton decides
at decoration time whether they are built for a GPU or for the interpreter (``TRITON_INTERPRET=1`` when this
module is first imported: CPU tensors, used by the tests).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = [
    "ALPHA_AE",
    "ALPHA_NONE",
    "ALPHA_REGIONS",
    "BLOCK",
    "GX_LOG_TAILED",
    "GX_NONE",
    "GX_REGIONS",
    "INTERPRETED",
    "MAX_PROGRAMS",
    "NUM_WARPS",
    "qrelu_bwd_kernel",
    "qrelu_fwd_kernel",
]

#: Whether the kernels were built for the Triton interpreter (CPU tensors) instead of a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRETED:
    try:  # imported lazily at the first launch, where it asserts TRITON_INTERPRET is still set: import it now
        import triton.experimental.gluon  # noqa: F401
    except Exception:
        pass

BLOCK = 1024  # elements per program and loop step; a multiple of 4 (one code byte holds four elements)
MAX_PROGRAMS = 1024  # backward grid cap: programs loop over blocks, so the α partial sums stay few
NUM_WARPS = 4

# Backward selectors (constexpr): what to write for grad_x, and which α gradient to reduce.
GX_NONE, GX_REGIONS, GX_LOG_TAILED = 0, 1, 2
ALPHA_NONE, ALPHA_REGIONS, ALPHA_AE = 0, 1, 2

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite float32


@triton.jit
def _round_half_even(q):
    """torch.round on float32: nearest integer, ties to even, sign (and -0.0) kept, NaN/inf unchanged."""
    f = tl.math.floor(q)
    d = q - f  # exact
    half = f * 0.5
    odd = half != tl.math.floor(half)
    r = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))
    r = tl.where(d != d, q, r)  # q = +-inf or NaN
    sign = q.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _f32(v):
    """Exact upcast to float32 (bfloat16 through its bits: the interpreter mangles bfloat16 subnormals)."""
    if v.dtype == tl.bfloat16:
        return (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return v.to(tl.float32)


@triton.jit
def _cast_out(v, out_ptr, OUT_BF16: tl.constexpr):
    """float32 -> the element type of ``out_ptr``, round to nearest even (bfloat16 by hand: the interpreter
    truncates, and the same integer code then runs on the GPU)."""
    if OUT_BF16:
        b = v.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(out_ptr.dtype.element_ty)


@triton.jit
def qrelu_fwd_kernel(
    x_ptr,
    alpha_ptr,
    y_ptr,
    code_ptr,
    n,
    levels,
    alpha_floor,
    NEAREST: tl.constexpr,
    WANT_CODE: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
    offs = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
    mask = offs < n
    v = _f32(tl.load(x_ptr + offs, mask=mask, other=0.0))
    a = _f32(tl.load(alpha_ptr))
    a = tl.where(a < alpha_floor, alpha_floor, a)  # clamp_min, NaN kept
    top = a * levels
    q = tl.math.div_rn(v, a)
    if NEAREST:
        k = _round_half_even(q)
    else:
        k = tl.math.ceil(q)
    k = tl.where(k < 0.0, 0.0, k)  # clamp(0, L) as torch.clamp: NaN kept, -0.0 kept
    k = tl.where(k > levels, levels, k)
    y = k * a
    y = tl.where(tl.abs(v) > _FLT_MAX, v, y)  # +-inf stay +-inf
    tl.store(y_ptr + offs, _cast_out(y, y_ptr, OUT_BF16), mask=mask)
    if WANT_CODE:
        c = (v > 0.0).to(tl.uint8) + (v > top).to(tl.uint8)
        shifts = (tl.arange(0, 4) * 2).to(tl.uint8)
        packed = tl.sum(c << shifts[None, :], axis=1).to(tl.uint8)
        tl.store(code_ptr + rows, packed, mask=rows < (n + 3) // 4)


@triton.jit
def qrelu_bwd_kernel(
    g_ptr,
    src_ptr,
    y_ptr,
    alpha_ptr,
    gx_ptr,
    partial_ptr,
    counter_ptr,
    out_ptr,
    n,
    levels,
    alpha_floor,
    m0,
    m1,
    m2,
    w_in,
    w_above,
    scale,
    FROM_X: tl.constexpr,
    GX: tl.constexpr,
    ALPHA: tl.constexpr,
    OUT_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    a = _f32(tl.load(alpha_ptr))
    a = tl.where(a < alpha_floor, alpha_floor, a)
    top = a * levels
    acc_in = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    acc_above = tl.zeros([BLOCK // 4, 4], dtype=tl.float32)
    shifts = (tl.arange(0, 4) * 2).to(tl.uint8)
    base = pid.to(tl.int64) * (BLOCK // 4)  # first code byte (element / 4) of this program's block
    step = nprog.to(tl.int64) * (BLOCK // 4)
    for _ in range(pid, tl.cdiv(n, BLOCK), nprog):
        rows = base + tl.arange(0, BLOCK // 4)
        base += step
        offs = rows[:, None] * 4 + tl.arange(0, 4)[None, :]
        mask = offs < n
        g = _f32(tl.load(g_ptr + offs, mask=mask, other=0.0))
        if FROM_X:  # src is the forward input: regions from x itself
            xv = _f32(tl.load(src_ptr + offs, mask=mask, other=0.0))
            above = xv > top
            inside = tl.where(above, False, xv > 0.0)
            if GX == 2:
                t = xv - top + 1.0
                t = tl.where(t < 1.0, 1.0, t)  # clamp_min(1), NaN kept
                tail = tl.math.div_rn(tl.full(xv.shape, 1.0, tl.float32), t)
                d = tl.where(above, tail, tl.where(xv > 0.0, 1.0, 0.0))
                d = _f32(_cast_out(d, gx_ptr, OUT_BF16))  # the proxy in the gradient's dtype
                tl.store(gx_ptr + offs, _cast_out(g * d, gx_ptr, OUT_BF16), mask=mask)
        else:
            packed = tl.load(src_ptr + rows, mask=rows < (n + 3) // 4, other=0)
            c = (packed[:, None] >> shifts[None, :]) & 3
            above = c == 2
            inside = c == 1
            if GX == 1:
                m = tl.where(above, m2, tl.where(inside, m1, m0))
                tl.store(gx_ptr + offs, _cast_out(g * m, gx_ptr, OUT_BF16), mask=mask)
        if ALPHA == 1:
            acc_in += tl.where(inside, g, 0.0)
            acc_above += tl.where(above, g, 0.0)
        if ALPHA == 2:
            acc_in += g * _f32(tl.load(y_ptr + offs, mask=mask, other=0.0))
    if ALPHA != 0:
        tl.store(partial_ptr + 2 * pid, tl.sum(tl.sum(acc_in, axis=1), axis=0))
        tl.store(partial_ptr + 2 * pid + 1, tl.sum(tl.sum(acc_above, axis=1), axis=0))
        tl.debug_barrier()
        done = tl.atomic_add(counter_ptr, 1, sem="acq_rel")
        if done == nprog - 1:  # the last program: reduce every partial in a fixed order
            r = tl.arange(0, RBLOCK)
            t_in = tl.zeros([RBLOCK], dtype=tl.float32)
            t_above = tl.zeros([RBLOCK], dtype=tl.float32)
            for start in range(0, nprog, RBLOCK):
                idx = start + r
                t_in += tl.load(partial_ptr + 2 * idx, mask=idx < nprog, other=0.0, cache_modifier=".cg")
                t_above += tl.load(
                    partial_ptr + 2 * idx + 1, mask=idx < nprog, other=0.0, cache_modifier=".cg"
                )
            s_in = tl.sum(t_in, axis=0)
            s_above = tl.sum(t_above, axis=0)
            if ALPHA == 2:
                total = tl.math.div_rn(s_in, a)
            else:
                total = s_above * w_above
                total = tl.where(w_in != 0.0, total + s_in * w_in, total)
            ga = total * scale
            ga = tl.where(ga < -1.0, -1.0, tl.where(ga > 1.0, 1.0, ga))  # clamp(-1, 1), NaN kept
            tl.store(out_ptr, ga)
            tl.atomic_xchg(counter_ptr, 0)  # ready for the next launch on this stream
