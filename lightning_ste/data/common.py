"""What every data module shares: where the data lives, and tensor datasets served by index batches."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DATA_ENV", "BatchIndexedTensors", "resolve_root", "subset_indices", "tensor_loader"]

DATA_ENV = "LIGHTNING_STE_DATA"


def resolve_root(root: str | os.PathLike | None) -> Path:
    """``root`` when given, else ``$LIGHTNING_STE_DATA``, else ``./data``."""
    if root is not None:
        return Path(root).expanduser()
    return Path(os.environ.get(DATA_ENV) or "./data").expanduser()


def subset_indices(n: int, size: int | None, seed: int) -> Tensor | None:
    """A seeded random subset of ``size`` of ``range(n)``; None for the whole set."""
    if size is None or size >= n:
        return None
    if size < 1:
        raise ValueError(f"a subset size must be >= 1, got {size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


class BatchIndexedTensors(TensorDataset):
    """A TensorDataset the DataLoader reads a whole batch from with one index per tensor (``__getitems__``)
    instead of ``batch_size`` single items and a stack; samplers (shuffle, Lightning's DistributedSampler)
    are unchanged."""

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, ...]:
        index = torch.as_tensor(indices)
        return tuple(t[index] for t in self.tensors)


def _as_is(batch: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return batch


def tensor_loader(
    x: Tensor, y: Tensor, batch_size: int, shuffle: bool, drop_last: bool = False
) -> DataLoader:
    """A DataLoader over in-memory tensors (no workers: indexing a tensor is cheaper than a worker hop)."""
    return DataLoader(
        BatchIndexedTensors(x, y),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=_as_is,
    )
