"""Backends of the quantized ReLU and the one place that chooses between them (:mod:`.backend`).

``cpu.py`` (+ ``cpu_kernels.cpp``): fused C++ kernels for CPU tensors, also the binary-weight kernels;
``triton_relu.py`` (the kernels) + ``triton_ops.py`` (their launch wrappers, ``torch.library`` custom
ops): fused Triton kernels for CUDA tensors. ``LIGHTNING_STE_KERNELS`` = ``auto`` (default) | ``eager`` |
``cpu`` | ``triton`` (``0`` means ``eager``, ``1`` means ``auto``). See :func:`backend_for`.
"""

from lightning_ste.kernels.backend import BACKENDS, backend_for, setting, triton_usable

__all__ = ["BACKENDS", "backend_for", "setting", "triton_usable"]
