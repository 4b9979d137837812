"""Fused Triton kernels of the quantized ReLU: one pass forward, one pass backward, a 2-bit region code.

Forward reads ``x`` once and writes ``y`` and a packed region code (four elements a byte: 0 for ``x <= 0``,
1 for ``0 < x <= L*alpha``, 2 for ``x > L*alpha``). Backward reads the gradient and the code (``x`` for the
input-dependent log-tailed proxy, ``y`` for ``alpha_grad="ae"``), writes ``grad * mu'(x)`` and reduces the
α gradient in the same launch: every program stores its partial sums, the last program to finish (an atomic
counter) adds them in a fixed order, so the result is deterministic. ``alpha`` is read on the device: no
host synchronisation. Every operation rounds as the eager torch formula does (IEEE division, float32
arithmetic, round-to-nearest-even casts), so values and ``grad_x`` are bit-identical to it.

The kernels work on the dense storage in memory order, so channels_last stays channels_last. They run on
CUDA tensors, and on CPU tensors when this module was imported with ``TRITON_INTERPRET=1`` (the Triton
interpreter; used by the tests). Both entry points are ``torch.library`` custom ops with fake
implementations, so ``torch.compile`` traces them without graph breaks.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading

import torch
import triton
import triton.language as tl
from torch import Tensor

from lightning_ste.config import ALPHA_FLOOR

__all__ = ["DTYPES", "INTERPRETED", "relu_backward", "relu_forward"]

#: Whether the kernels were built for the Triton interpreter (CPU tensors) instead of a GPU.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if INTERPRETED:
    try:  # imported lazily at the first launch, where it asserts TRITON_INTERPRET is still set: import it now
        import triton.experimental.gluon  # noqa: F401
    except Exception:
        pass
#: Input dtypes the kernels handle (float64 stays on the eager path).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

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
def _qrelu_fwd_kernel(
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
def _qrelu_bwd_kernel(
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


_counters: dict[tuple[str, int, int], Tensor] = {}
_counter_lock = threading.Lock()


def _counter(device: torch.device) -> Tensor:
    """The last-program counter, zero between launches (the last program resets it): one per device and
    CUDA stream, so kernels queued on different streams never share one."""
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device.type, device.index or 0, stream)
    counter = _counters.get(key)
    if counter is None:
        with _counter_lock:
            counter = _counters.setdefault(key, torch.zeros(1, dtype=torch.int32, device=device))
    return counter


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU (Triton launches on the current device), nothing to do on the CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("lightning_ste_triton::qrelu_forward", mutates_args=())
def _forward_op(
    x: Tensor, alpha: Tensor, levels: int, nearest: bool, want_code: bool
) -> tuple[Tensor, Tensor]:
    """``(y, code)`` of :func:`relu_forward` for a dense ``x``: one launch, one program per ``BLOCK``."""
    y = torch.empty_like(x)  # a dense x: the same strides, so y and the code follow x's memory order
    n = x.numel()
    code = torch.empty(((n + 3) // 4) if want_code else 0, dtype=torch.uint8, device=x.device)
    if n:
        with _on(x.device):
            _qrelu_fwd_kernel[(triton.cdiv(n, BLOCK),)](
                x,
                alpha,
                y,
                code,
                n,
                float(levels),
                ALPHA_FLOOR,
                NEAREST=nearest,
                WANT_CODE=want_code,
                OUT_BF16=x.dtype == torch.bfloat16,
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
                enable_fp_fusion=False,  # no fused multiply-add: every product rounds as in torch
            )
    return y, code


@_forward_op.register_fake
def _forward_fake(
    x: Tensor, alpha: Tensor, levels: int, nearest: bool, want_code: bool
) -> tuple[Tensor, Tensor]:
    n = x.numel()
    return torch.empty_like(x), x.new_empty(((n + 3) // 4) if want_code else 0, dtype=torch.uint8)


@torch.library.custom_op("lightning_ste_triton::qrelu_backward", mutates_args=())
def _backward_op(
    grad: Tensor,
    src: Tensor,
    y: Tensor | None,
    alpha: Tensor,
    levels: int,
    from_x: bool,
    gx_kind: int,
    m0: float,
    m1: float,
    m2: float,
    alpha_kind: int,
    w_in: float,
    w_above: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """``(grad_x or [0], grad_alpha float32 0-dim or [0])`` of :func:`relu_backward`: one launch."""
    n = grad.numel()
    gx = torch.empty_like(grad) if gx_kind != GX_NONE else grad.new_empty(0)
    if alpha_kind == ALPHA_NONE:
        out = grad.new_empty(0, dtype=torch.float32)
    elif n == 0:
        return gx, grad.new_zeros((), dtype=torch.float32)
    else:
        out = grad.new_empty((), dtype=torch.float32)
    if n == 0:
        return gx, out
    programs = min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)
    partials = grad.new_empty(2 * programs if alpha_kind != ALPHA_NONE else 0, dtype=torch.float32)
    counter = _counter(grad.device) if alpha_kind != ALPHA_NONE else partials.new_empty(0, dtype=torch.int32)
    rblock = max(triton.next_power_of_2(programs), 16)
    with _on(grad.device):
        _qrelu_bwd_kernel[(programs,)](
            grad,
            src,
            y if y is not None else grad.new_empty(0),  # placeholders are never read: no bytes
            alpha,
            gx,
            partials,
            counter,
            out,
            n,
            float(levels),
            ALPHA_FLOOR,
            m0,
            m1,
            m2,
            w_in,
            w_above,
            scale,
            FROM_X=from_x,
            GX=gx_kind,
            ALPHA=alpha_kind,
            OUT_BF16=grad.dtype == torch.bfloat16,
            BLOCK=BLOCK,
            RBLOCK=rblock,
            num_warps=NUM_WARPS,
            enable_fp_fusion=False,  # no fused multiply-add: every product rounds as in torch
        )
    return gx, out


@_backward_op.register_fake
def _backward_fake(
    grad: Tensor,
    src: Tensor,
    y: Tensor | None,
    alpha: Tensor,
    levels: int,
    from_x: bool,
    gx_kind: int,
    m0: float,
    m1: float,
    m2: float,
    alpha_kind: int,
    w_in: float,
    w_above: float,
    scale: float,
) -> tuple[Tensor, Tensor]:
    gx = torch.empty_like(grad) if gx_kind != GX_NONE else grad.new_empty(0)
    out = (
        grad.new_empty((), dtype=torch.float32)
        if alpha_kind != ALPHA_NONE
        else grad.new_empty(0, dtype=torch.float32)
    )
    return gx, out


def dense(x: Tensor) -> bool:
    """Whether ``x`` covers its storage without gaps or overlap (any dimension order): the kernels' layout."""
    if x.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(x.dim()), key=lambda d: (x.stride(d), x.shape[d])):
        if x.shape[d] != 1:
            if x.stride(d) != expected:
                return False
            expected *= x.shape[d]
    return True


def relu_forward(
    x: Tensor, alpha: Tensor, levels: int, nearest: bool, want_code: bool = True
) -> tuple[Tensor, Tensor]:
    """``(y, code)``: ``y = a * clamp(round(x / a), 0, L)`` (``round`` = ceil, or nearest-even when
    ``nearest``), ``a = max(alpha, 1e-3)``, ``L = levels``, with ``y = x`` where ``x = +-inf``; ``code``: uint8,
    ``ceil(n / 4)`` bytes, element ``i`` of ``x``'s memory order in bits ``2*(i % 4)`` of byte ``i // 4`` (0 for
    ``x <= 0``, 1 for ``0 < x <= L*a``, 2 above), or empty when ``want_code`` is False.

    ``x``: float32/float16/bfloat16 (computed in float32, rounded once to ``x``'s dtype); non-dense inputs are
    made contiguous first. ``alpha``: 0-dim tensor, read on ``x``'s device.
    """
    if not dense(x):
        x = x.contiguous()
    if alpha.device != x.device:
        alpha = alpha.to(x.device)
    y, code = _forward_op(x, alpha.detach(), levels, nearest, want_code)
    return y, code


def _round_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to ``dtype`` (float32, float16 or bfloat16, to nearest even), as a Python float."""
    (f32,) = struct.unpack("<f", struct.pack("<f", value))
    if dtype == torch.float16:
        return struct.unpack("<e", struct.pack("<e", f32))[0]
    if dtype == torch.bfloat16 and math.isfinite(f32):
        (b,) = struct.unpack("<I", struct.pack("<f", f32))
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        return struct.unpack("<f", struct.pack("<I", b & 0xFFFFFFFF))[0]
    return f32


def relu_backward(
    grad: Tensor,
    src: Tensor,
    alpha: Tensor,
    levels: int,
    *,
    from_x: bool = False,
    gx_kind: int = GX_NONE,
    multipliers: tuple[float, float, float] = (0.0, 0.0, 0.0),
    alpha_kind: int = ALPHA_NONE,
    alpha_weights: tuple[float, float] = (0.0, 0.0),
    alpha_lr_scale: float = 1.0,
    y: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``(grad_x, grad_alpha)`` in one launch; ``grad`` must have the strides of the forward output.

    ``src``: the packed code of :func:`relu_forward`, or with ``from_x`` the forward input ``x`` itself
    (its regions are then recomputed). ``gx_kind``: GX_NONE (no grad_x), GX_REGIONS
    (``grad * multipliers[region]``, the multipliers rounded to the gradient's dtype), GX_LOG_TAILED (needs
    ``from_x``: ``grad * mu'(x)``, ``mu' = 1/max(x - L*a + 1, 1)`` above ``L*a``, 1 inside, 0 below).
    ``alpha_kind``: ALPHA_REGIONS gives ``clamp(scale * (w_above * sum_above(grad) + w_in *
    sum_inside(grad)), -1, 1)`` with ``(w_in, w_above) = alpha_weights``; ALPHA_AE gives
    ``clamp(scale * sum(grad * y) / a, -1, 1)`` (needs ``y``); a float32 0-dim tensor, None for ALPHA_NONE.
    """
    if gx_kind == GX_LOG_TAILED and not from_x:
        raise ValueError("`gx_kind`=GX_LOG_TAILED needs `from_x`=True (src = the forward input)")
    if alpha_kind == ALPHA_AE and y is None:
        raise ValueError("`alpha_kind`=ALPHA_AE needs `y`, the forward output")
    if alpha.device != grad.device:
        alpha = alpha.to(grad.device)
    m0, m1, m2 = (float(v) for v in multipliers)
    if gx_kind == GX_REGIONS and not {m0, m1, m2} <= {0.0, 1.0}:
        # the eager formula multiplies by the multipliers in the gradient's dtype
        m0, m1, m2 = (_round_to(v, grad.dtype) for v in (m0, m1, m2))
    w_in, w_above = (float(v) for v in alpha_weights)
    gx, out = _backward_op(
        grad,
        src,
        y,
        alpha.detach(),
        levels,
        from_x,
        gx_kind,
        m0,
        m1,
        m2,
        alpha_kind,
        w_in,
        w_above,
        float(alpha_lr_scale),
    )
    return (gx if gx_kind != GX_NONE else None), (out if alpha_kind != ALPHA_NONE else None)
