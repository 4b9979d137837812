"""The one dispatch point of the quantized ReLU: which backend runs for a given tensor.

``LIGHTNING_STE_KERNELS`` (read at every call):

- ``auto`` (default, also ``1``): the fused C++ kernels for CPU tensors when they build, the fused Triton
  kernels for CUDA tensors when Triton imports (NVIDIA GPUs of compute capability 7.0 or newer; ROCm only
  when named), the eager torch formula otherwise. Under ``torch.compile`` a CUDA tensor takes the eager
  formula, which Inductor fuses into the neighbouring kernels (a custom op would be an opaque fusion
  barrier).
- ``eager`` (also ``0``): the torch formula everywhere (and the C++ weight kernels are not built either).
- ``cpu`` / ``triton``: that backend or a ``RuntimeError`` saying why it cannot run: never a silent
  fallback. ``triton`` takes CPU tensors only when the kernels were built for the Triton interpreter
  (``TRITON_INTERPRET=1`` when :mod:`lightning_ste.kernels.triton_relu` was first imported).

``torch.jit.trace`` always records the eager formula (a traced graph must not hold an opaque kernel).
"""

from __future__ import annotations

import os
from types import ModuleType

import torch
from torch import Tensor

from lightning_ste.kernels import cpu as cpu_kernels
from lightning_ste.quantizers import ste as _ste

__all__ = ["BACKENDS", "backend_for", "setting", "triton_module", "triton_usable"]

BACKENDS = ("auto", "eager", "cpu", "triton")
_ALIASES = {"0": "eager", "1": "auto", "": "auto"}
ENV = "LIGHTNING_STE_KERNELS"

_triton: dict[str, object] = {}
_capabilities: dict[int, tuple[int, int]] = {}


def setting() -> str:
    """The backend requested by ``LIGHTNING_STE_KERNELS``; ``ValueError`` naming the allowed values."""
    raw = os.environ.get(ENV, "auto").strip().lower()
    value = _ALIASES.get(raw, raw)
    if value not in BACKENDS:
        raise ValueError(
            f"unknown {ENV}={os.environ.get(ENV)!r}; allowed: {', '.join(BACKENDS)} (0 = eager, 1 = auto)"
        )
    return value


def triton_module() -> ModuleType | None:
    """:mod:`lightning_ste.kernels.triton_ops` (which imports the kernels), imported on first use; None when
    Triton does not import."""
    if "module" not in _triton:
        try:
            from lightning_ste.kernels import triton_ops
        except Exception as err:  # no triton, no GPU driver for it, ...
            _triton["module"], _triton["error"] = None, f"{type(err).__name__}: {err}"
        else:
            _triton["module"] = triton_ops
    return _triton["module"]  # type: ignore[return-value]


def _triton_problem(x: Tensor, ste_name: str) -> str | None:
    """Why the Triton kernels cannot run on ``x`` with ``ste_name``; None when they can."""
    if x.device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA tensors, got a {x.device.type} tensor"
    if x.device.type == "cuda" and not torch.cuda.is_available():
        return "CUDA is not available"
    if x.device.type == "cuda" and _capability(x.device) < (7, 0):
        return f"Triton needs a GPU of compute capability 7.0 or newer, got {_capability(x.device)}"
    module = triton_module()
    if module is None:
        return f"Triton does not import ({_triton.get('error')})"
    if x.device.type == "cpu" and not module.INTERPRETED:
        return "a CPU tensor needs the Triton interpreter (TRITON_INTERPRET=1 before the first use)"
    if x.device.type == "cuda" and module.INTERPRETED:
        return "the Triton kernels were built for the interpreter (TRITON_INTERPRET=1), not for the GPU"
    if x.dtype not in module.DTYPES:
        return f"Triton kernels handle float32/float16/bfloat16, got {x.dtype}"
    entry = _ste.get(ste_name)
    if entry.regions is None and entry.derivative is not _ste._log_tailed_relu:
        return f"STE {ste_name!r} is an arbitrary Python proxy; only the eager formula can run it"
    return None


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def triton_usable(x: Tensor, ste_name: str = "clipped_relu") -> bool:
    """Whether the Triton kernels can run the quantized ReLU of ``x`` with STE ``ste_name``."""
    return _triton_problem(x, ste_name) is None


def _cpu_problem(x: Tensor, ste_name: str) -> str | None:
    if x.device.type != "cpu":
        return f"the CPU kernels run on CPU tensors, got a {x.device.type} tensor"
    if x.dtype not in cpu_kernels.DTYPES:
        return f"the CPU kernels handle floating-point tensors, got {x.dtype}"
    if _ste.get(ste_name).regions is None:
        return f"the CPU kernels handle region-constant STEs (identity, relu, clipped_relu), not {ste_name!r}"
    if not cpu_kernels.usable(x):
        if torch.compiler.is_compiling():
            return "the CPU kernels must be built before torch.compile traces them (call them once eagerly)"
        return "the CPU kernels could not be built here (see the warning at first use)"
    return None


def backend_for(x: Tensor, ste: str = "clipped_relu") -> str:
    """The backend that runs :func:`lightning_ste.quantizers.activation.quantized_relu` on ``x`` with STE ``ste``:
    ``"eager"``, ``"cpu"`` or ``"triton"``, per ``LIGHTNING_STE_KERNELS`` (see the module docstring).

    A named backend that cannot run raises ``RuntimeError`` with the reason.
    """
    choice = setting()
    if choice == "eager" or torch.jit.is_tracing():
        return "eager"
    if choice == "cpu":
        problem = _cpu_problem(x, ste)
        if problem:
            raise RuntimeError(f"{ENV}=cpu: {problem}")
        return "cpu"
    if choice == "triton":
        problem = _triton_problem(x, ste)
        if problem:
            raise RuntimeError(f"{ENV}=triton: {problem}")
        return "triton"
    # auto
    if x.device.type == "cpu":
        return "cpu" if _cpu_problem(x, ste) is None else "eager"
    # On CUDA (not ROCm, where the kernels are untested); under torch.compile Inductor fuses the formula.
    if (
        x.device.type == "cuda"
        and torch.version.hip is None
        and not torch.compiler.is_compiling()
        and _triton_problem(x, ste) is None
    ):
        return "triton"
    return "eager"
