"""Shared fixtures: where the real MNIST lives, offline W&B, deterministic seeds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

_REPO = Path(__file__).resolve().parents[1]


def find_mnist_root() -> Path:
    """The folder holding ``MNIST/raw`` (torchvision layout): $LIGHTNING_STE_MNIST, ../shared/data, /work/shared/data."""
    candidates = [
        os.environ.get("LIGHTNING_STE_MNIST"),
        _REPO.parent / "shared" / "data",
        "/work/shared/data",
    ]
    for c in candidates:
        if c and (Path(c) / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
            return Path(c)
    raise FileNotFoundError(
        "real MNIST not found: set LIGHTNING_STE_MNIST to the folder holding MNIST/raw "
        f"(looked in {[str(c) for c in candidates if c]})"
    )


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    return find_mnist_root()


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
