"""Fused CPU kernels of the quantized ReLU: one pass forward, one pass backward, a 2-bit region code.

The eager formula of :mod:`lightning_ste.quantizers.activation` takes about ten elementwise passes and keeps a one-byte
region code per element. The kernels here compute the same values in one pass each way and keep two bit
planes instead (``x > 0`` and ``x > L*alpha``, eight elements a byte), 1/16 of the bytes of a float32
input. They are C++ (``cpu_kernels.cpp`` beside this file; AVX-512 / AVX2 where the CPU has it, plain C++
otherwise), built with ``torch.utils.cpp_extension.load_inline`` the first time a CPU tensor needs them and cached on disk in a
build directory of their own per environment (interpreter and torch), one process building while the others
wait on a file lock; when the build fails (no compiler) :func:`available` is False and the eager path runs instead.

Set ``LIGHTNING_STE_KERNELS=eager`` (or ``0``) to never build or use them.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from functools import cache
from typing import TypeVar

import torch
from filelock import FileLock
from torch import Tensor

from lightning_ste._compat import cpp_build_directory

__all__ = [
    "DTYPES",
    "abs_mean",
    "available",
    "binary_blend_",
    "build_name",
    "build_once",
    "code_planes",
    "environment_key",
    "relu_backward",
    "relu_forward",
    "sign_scale",
    "source",
    "usable",
    "weights_usable",
]

_log = logging.getLogger(__name__)
_T = TypeVar("_T")
#: Input dtypes of the quantized ReLU kernels (the weight kernels take float32/float64).
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_lock = threading.Lock()
_state: dict[str, object] = {}


@cache
def source() -> str:
    """The C++ source of the kernels (``cpu_kernels.cpp``, shipped as package data)."""
    return (
        importlib.resources.files("lightning_ste.kernels")
        .joinpath("cpu_kernels.cpp")
        .read_text(encoding="utf-8")
    )


def _flags() -> list[str]:
    # The kernels are built on the machine that runs them, so they may use its full instruction set; no
    # fused multiply-add contraction, so every product and sum rounds as in the eager torch formula.
    return ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-ffp-contract=off"]


def environment_key() -> str:
    """What makes a build of the kernels belong to one environment: the interpreter and the torch it imports.

    Two environments with the same torch version have different headers and libraries on different paths; a
    shared build directory made each rebuild the other's kernels (and a rebuild under a DDP process that was
    loading the library aborted it).
    """
    return "\n".join((sys.prefix, sys.version, os.path.dirname(torch.__file__), torch.__version__))


def build_name(environment: str | None = None) -> str:
    """Name (and build directory) of the kernels for this source, CPU, compiler flags and environment."""
    capability = torch.backends.cpu.get_cpu_capability()
    key = "\n".join((source(), capability, " ".join(_flags()), environment or environment_key()))
    return f"lightning_ste_kernels_{hashlib.sha1(key.encode()).hexdigest()[:12]}"


def build_once(directory: str, artifact: str, build: Callable[[], _T], what: str) -> _T:
    """``build()`` under an exclusive file lock on ``directory``: one process builds, the others wait for it.

    ``artifact`` is the file a finished build leaves; when it is missing as the lock is taken, this process is
    the one that builds, and one log line says so (first use in this environment takes about a minute).
    """
    os.makedirs(directory, exist_ok=True)
    with FileLock(os.path.join(directory, "lightning_ste_build.lock")):
        if not os.path.exists(artifact):
            _log.warning(
                "lightning_ste: building %s (first use in this environment, about a minute) in %s",
                what,
                directory,
            )
        return build()


def _build() -> bool:
    from torch.utils import cpp_extension

    name = build_name()
    directory = cpp_build_directory(name)  # honours TORCH_EXTENSIONS_DIR
    suffix = ".pyd" if sys.platform == "win32" else ".so"

    def load() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load_inline(
                name=name,
                cpp_sources=source(),
                extra_cflags=_flags(),
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                build_directory=directory,
                verbose=False,
            )

    build_once(directory, os.path.join(directory, name + suffix), load, "the fused CPU kernels")
    if not hasattr(torch.ops.lightning_ste_kernels, "qrelu_forward"):
        return False
    try:
        _register_fakes()
        _state["compile"] = True
    except Exception:  # eager use is unaffected; torch.compile then traces the torch formula
        _state["compile"] = False
    return True


def _register_fakes() -> None:
    """Shapes of the kernels' outputs for torch.compile, which then calls them as opaque extern kernels."""

    @torch.library.register_fake("lightning_ste_kernels::qrelu_forward")
    def _forward_fake(x: Tensor, alpha: Tensor, levels: int, nearest: bool) -> list[Tensor]:
        return [torch.empty_like(x), x.new_empty((2, (x.numel() + 7) // 8), dtype=torch.uint8)]

    @torch.library.register_fake("lightning_ste_kernels::qrelu_backward")
    def _backward_fake(
        g: Tensor, code: Tensor, m0: float, m1: float, m2: float, want_gx: bool, want_sums: bool
    ) -> list[Tensor]:
        gx = torch.empty_like(g) if want_gx else g.new_empty((0,), dtype=torch.float64)
        return [gx, g.new_empty((2,), dtype=torch.float64)]


def available() -> bool:
    """Whether the fused CPU kernels are built (building them on the first call); False if that fails."""
    ok = _state.get("ok")
    if ok is not None:
        return bool(ok)
    with _lock:
        if "ok" not in _state:
            from lightning_ste.kernels.backend import setting  # the one parser (it imports this module)

            if setting() == "eager":
                _state["ok"] = False
            else:
                try:
                    _state["ok"] = _build()
                except Exception as err:  # no compiler, no headers, ...: the eager path still works
                    _state["ok"] = False
                    warnings.warn(
                        f"lightning_ste: fused CPU kernels unavailable ({type(err).__name__}); using the eager path",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return bool(_state["ok"])


def usable(x: Tensor) -> bool:
    """Whether :func:`relu_forward` handles ``x``: a CPU float tensor, outside jit tracing (which must see the
    torch formula, not an opaque C++ call); under torch.compile only when the kernels are already built."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or torch.jit.is_tracing():
        return False
    if torch.compiler.is_compiling():
        # Building inside a traced function is impossible: use the kernels only when already built.
        return _state.get("ok") is True and _state.get("compile") is True
    return available()


def relu_forward(x: Tensor, a: Tensor, levels: int, nearest: bool) -> tuple[Tensor, Tensor]:
    """``(y, code)``: the quantized ReLU of ``x`` with clamped step ``a`` (0-dim, x's compute dtype), and
    the ``[2, ceil(n/8)]`` uint8 bit planes of ``x > 0`` and ``x > levels * a`` in ``x``'s memory order."""
    if not _dense(x):
        x = x.contiguous()
    y, code = torch.ops.lightning_ste_kernels.qrelu_forward(x, a, levels, nearest)
    return y, code


def relu_backward(
    grad: Tensor,
    code: Tensor,
    strides: tuple[int, ...],
    multipliers: tuple[float, float, float] | None,
    want_sums: bool,
) -> tuple[Tensor | None, Tensor]:
    """``(grad * m[region], [sum of grad inside, sum of grad above])``; ``multipliers=None`` skips the first.

    ``strides`` are those of the forward output, the memory order of ``code``.
    """
    if grad.stride() != strides:
        grad = torch.empty_strided(grad.shape, strides, dtype=grad.dtype).copy_(grad)
    m = multipliers or (0.0, 0.0, 0.0)
    gx, sums = torch.ops.lightning_ste_kernels.qrelu_backward(
        grad, code, m[0], m[1], m[2], multipliers is not None, want_sums
    )
    return (gx if multipliers is not None else None), sums


def weights_usable(w: Tensor) -> bool:
    """Whether :func:`abs_mean` / :func:`sign_scale` handle ``w`` (contiguous CPU float32/float64)."""
    return (
        w.device.type == "cpu"
        and w.dtype in (torch.float32, torch.float64)
        and w.numel() > 0
        and w.is_contiguous()
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and available()
    )


def abs_mean(w: Tensor) -> Tensor:
    """``mean(|w|)`` in one read of ``w`` (0-dim, ``w``'s dtype), accumulated in float64."""
    return torch.ops.lightning_ste_kernels.abs_mean(w)


def sign_scale(w: Tensor, scale: Tensor, out: Tensor | None = None) -> Tensor:
    """``sign(w) * scale`` in one pass; ``scale`` a 0-dim tensor of ``w``'s dtype; into ``out`` when given
    (contiguous, ``w``'s shape and dtype)."""
    if out is None:
        return torch.ops.lightning_ste_kernels.sign_scale(w, scale)
    return torch.ops.lightning_ste_kernels.sign_scale_out(w, scale, out)


def binary_blend_(w: Tensor, rho: float, scale: Tensor | None = None) -> Tensor:
    """BCGD19 blend of binary weights in place, one read and one write: ``w <- (1 - rho) w + rho q(w)``,
    ``q(w) = sign(w) * mean|w|``, rounded exactly as ``w.mul_(1 - rho).add_(q * rho)``; ``scale``: mean|w| when
    already known (then the read that computes it is skipped)."""
    torch.ops.lightning_ste_kernels.binary_blend_(w, float(rho), scale)
    # An in-place change autograd must see (the op has no autograd kernel to bump the version).
    torch.autograd.graph.increment_version(w)
    return w


def code_planes(x: Tensor, top: Tensor) -> Tensor:
    """Reference packing of the region code with torch operations (for tests): ``[2, ceil(n/8)]`` uint8."""
    flat = x.permute(*_memory_order(x)).reshape(-1) if x.dim() else x.reshape(-1)
    bits = torch.stack([flat > 0, flat > top])
    pad = (-flat.numel()) % 8
    bits = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(2, -1, 8)
    weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
    return (bits * weights).sum(-1, dtype=torch.uint8)


def _dense(x: Tensor) -> bool:
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


def _memory_order(x: Tensor) -> list[int]:
    """Dimensions of a dense tensor from the slowest to the fastest in memory."""
    return sorted(range(x.dim()), key=lambda d: (-x.stride()[d], -x.shape[d]))
