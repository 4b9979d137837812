"""The Triton quantized ReLU as ``torch.library`` custom ops (docs/math.md §1; YLZ19, BCGD19): the launch
wrappers of the kernels in :mod:`.triton_relu`, ``lightning_ste_triton::qrelu_forward`` / ``qrelu_backward``.

Both ops have fake implementations, so ``torch.compile`` traces them without graph breaks. They run on CUDA
tensors, and on CPU tensors when the kernels were built for the Triton interpreter (``INTERPRETED``).
"""

from __future__ import annotations

import contextlib
import math
import struct
import threading

import torch
import triton
from torch import Tensor

from lightning_ste.config import ALPHA_FLOOR
from lightning_ste.kernels.triton_relu import (
    ALPHA_AE,
    ALPHA_NONE,
    ALPHA_REGIONS,
    BLOCK,
    GX_LOG_TAILED,
    GX_NONE,
    GX_REGIONS,
    INTERPRETED,
    MAX_PROGRAMS,
    NUM_WARPS,
    qrelu_bwd_kernel,
    qrelu_fwd_kernel,
)

# Selectors and INTERPRETED re-exported: the dispatch (backend.py) and the autograd function read them here.
__all__ = [
    "ALPHA_AE",
    "ALPHA_NONE",
    "ALPHA_REGIONS",
    "DTYPES",
    "GX_LOG_TAILED",
    "GX_NONE",
    "GX_REGIONS",
    "INTERPRETED",
    "dense",
    "relu_backward",
    "relu_forward",
]

#: Input dtypes the kernels handle (float64 stays on the eager path).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
            qrelu_fwd_kernel[(triton.cdiv(n, BLOCK),)](
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
        qrelu_bwd_kernel[(programs,)](
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
