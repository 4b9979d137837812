"""Shared fixtures: where the real MNIST lives, offline W&B, deterministic seeds."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def _import_triton_for_the_interpreter() -> None:
    # Without a GPU, tests/test_triton.py runs the Triton kernels in the interpreter. Triton decides at
    # decoration time, also for its own library functions (tl.sum is @triton.jit): triton.language must first be
    # imported with TRITON_INTERPRET=1, before any test module imports Lightning (which imports it too).
    if os.environ.get("LIGHTNING_STE_TRITON_DEVICE", "cpu") != "cpu" or "triton.language" in sys.modules:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        from lightning_ste.kernels import backend

        backend.triton_module()
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_the_interpreter()

_REPO = Path(__file__).resolve().parents[1]


def find_mnist_root() -> Path | None:
    """The folder holding ``MNIST/raw`` (torchvision layout): $LIGHTNING_STE_MNIST, else ``../shared/data`` beside
    the repository; None when neither has it."""
    candidates = [os.environ.get("LIGHTNING_STE_MNIST"), _REPO.parent / "shared" / "data"]
    for c in candidates:
        if c and (Path(c) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = find_mnist_root()
    if root is None:
        pytest.skip("real MNIST not found: set LIGHTNING_STE_MNIST to the folder holding MNIST/raw")
    return root


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for the test: many small ops are slower with two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
