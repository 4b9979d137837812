"""CIFAR-10 from the python pickles (``cifar-10-batches-py``), held as uint8 tensors; crop+flip augmentation."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from lightning_ste.recipes.data.common import (
    ResumableDataLoader,
    ResumableDataModule,
    resolve_root,
    resumable_loader,
    subset_indices,
)
from lightning_ste.recipes.hyperparameters import hparams

__all__ = ["CIFAR10DataModule", "read_cifar10", "write_cifar10"]

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def read_cifar10(root: Path, train: bool) -> tuple[Tensor, Tensor]:
    """uint8 images (N, 3, 32, 32) and int64 labels from ``root/cifar-10-batches-py``."""
    xs, ys = [], []
    for name in TRAIN_BATCHES if train else ("test_batch",):
        with open(root / FOLDER / name, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys, dtype=torch.long)


def write_cifar10(
    root: Path, train: tuple[np.ndarray, list[int]], test: tuple[np.ndarray, list[int]]
) -> None:
    """Write images (N, 3, 32, 32) uint8 and labels in the CIFAR-10 python format (for tests and small demos)."""
    folder = Path(root) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(train[1])), len(TRAIN_BATCHES))
    for name, idx in zip(TRAIN_BATCHES, chunks):
        data = {"data": train[0][idx].reshape(len(idx), -1), "labels": [int(train[1][i]) for i in idx]}
        with open(folder / name, "wb") as f:
            pickle.dump(data, f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test[0].reshape(len(test[1]), -1), "labels": [int(v) for v in test[1]]}, f)


class _Images(Dataset):
    """uint8 images -> normalized float; random 4-pixel-padded crop and horizontal flip when ``augment``."""

    def __init__(self, x: Tensor, y: Tensor, augment: bool) -> None:
        self.x, self.y, self.augment = x, y, augment
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.x[i].float().div_(255.0)
        if self.augment:
            padded = F.pad(img, (4, 4, 4, 4))
            top, left = torch.randint(0, 9, (2,)).tolist()
            img = padded[:, top : top + 32, left : left + 32]
            if torch.rand(()) < 0.5:
                img = img.flip(-1)
        return (img - self.mean) / self.std, self.y[i]


class CIFAR10DataModule(ResumableDataModule):
    """CIFAR-10 (50k train, 10k test used for validation); downloads to ``root`` when missing (torchvision).

    ``root`` holds ``cifar-10-batches-py``; None means ``$LIGHTNING_STE_DATA`` or ``./data``.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        val_batch_size: int = 500,
        num_workers: int = 4,
        pin_memory: bool = True,
        subset: int | None = None,
        val_subset: int | None = None,
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = resolve_root(root)

    def prepare_data(self) -> None:
        if (self.root / FOLDER / "test_batch").exists():
            return
        if not hparams(self).download:
            raise FileNotFoundError(
                f"CIFAR-10 not found: expected {self.root / FOLDER} (or set download=True)"
            )
        from torchvision.datasets import CIFAR10

        CIFAR10(str(self.root), train=True, download=True)

    def _data(self, train: bool, size: int | None, augment: bool) -> _Images:
        x, y = read_cifar10(self.root, train)
        idx = subset_indices(len(y), size, hparams(self).seed)
        if idx is not None:
            x, y = x[idx], y[idx]
        return _Images(x, y, augment)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_data = self._data(True, hparams(self).subset, augment=True)
        self.val_data = self._data(False, hparams(self).val_subset, augment=False)

    def _loader(self, data: _Images, batch_size: int, shuffle: bool) -> ResumableDataLoader:
        workers = hparams(self).num_workers
        return resumable_loader(
            data,
            batch_size,
            shuffle,
            num_workers=workers,
            pin_memory=hparams(self).pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            drop_last=shuffle and len(data) >= 2 * batch_size,
        )
