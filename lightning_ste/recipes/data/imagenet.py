"""ImageNet from an ImageFolder tree (``train/<wnid>/*.JPEG``, ``val/<wnid>/*.JPEG``), fed by worker processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from lightning_ste.recipes.data.common import (
    ResumableDataLoader,
    ResumableDataModule,
    resolve_root,
    resumable_loader,
    subset_indices,
)
from lightning_ste.recipes.hyperparameters import hparams

__all__ = ["ImageNetDataModule"]

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
LAYOUT = "<root>/train/<class>/<image>.JPEG and <root>/val/<class>/<image>.JPEG (torchvision ImageFolder)"


class ImageNetDataModule(ResumableDataModule):
    """ImageNet (ILSVRC-2012) train/val as ImageFolders; RandomResizedCrop+flip for training, resize+center crop.

    ``root`` holds ``train/`` and ``val/`` with one folder per class (val must be sorted into class folders);
    None means ``$LIGHTNING_STE_DATA/imagenet`` or ``./data/imagenet``. ``batch_size`` is per device.
    ``crop_size``/``resize_size`` default to 224/256; tests shrink them.
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 256,
        val_batch_size: int = 256,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        prefetch_factor: int = 4,
        crop_size: int = 224,
        resize_size: int = 256,
        subset: int | None = None,
        val_subset: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root).expanduser() if root is not None else resolve_root(None) / "imagenet"
        self._normalizers: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def _check_layout(self) -> None:
        missing = [s for s in ("train", "val") if not (self.root / s).is_dir()]
        if missing:
            raise FileNotFoundError(
                f"ImageNet root {str(self.root)!r} lacks {', '.join(s + '/' for s in missing)}: expected {LAYOUT}. "
                "Pass --data.root or set LIGHTNING_STE_DATA (its imagenet/ subfolder is used)."
            )

    def prepare_data(self) -> None:
        self._check_layout()

    def setup(self, stage: str | None = None) -> None:
        self._check_layout()
        hp = hparams(self)
        # Workers stop at uint8: a quarter of the bytes through shared memory and the host-to-device copy, and
        # no float pass per image on the CPU, the scarce resource when feeding a GPU (normalised after transfer).
        train_tf = transforms.Compose(
            [
                transforms.RandomResizedCrop(hp.crop_size),
                transforms.RandomHorizontalFlip(),
                transforms.PILToTensor(),
            ]
        )
        val_tf = transforms.Compose(
            [
                transforms.Resize(hp.resize_size),
                transforms.CenterCrop(hp.crop_size),
                transforms.PILToTensor(),
            ]
        )
        if stage in (None, "fit"):
            self.train_data = self._subset(self._folder("train", train_tf), hp.subset)
        self.val_data = self._subset(self._folder("val", val_tf), hp.val_subset)

    def _folder(self, split: str, transform: Any) -> ImageFolder:
        try:
            return ImageFolder(str(self.root / split), transform)
        except FileNotFoundError as err:  # no class folders, or class folders without images
            raise FileNotFoundError(
                f"ImageNet {split}/ under {str(self.root)!r} is not laid out as expected ({err}): expected {LAYOUT}"
            ) from err

    def _subset(self, data: ImageFolder, size: int | None) -> Dataset:
        idx = subset_indices(len(data), size, hparams(self).seed)
        return data if idx is None else Subset(data, idx.tolist())

    def _loader(self, data: Dataset, batch_size: int, shuffle: bool) -> ResumableDataLoader:
        hp = hparams(self)
        workers = hp.num_workers
        return resumable_loader(
            data,
            batch_size,
            shuffle,
            num_workers=workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.persistent_workers and workers > 0,
            prefetch_factor=hp.prefetch_factor if workers > 0 else None,
            drop_last=shuffle,
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """uint8 images -> float, normalised with ImageNet's mean and std, on the device they were moved to."""
        x, *rest = batch
        if x.dtype == torch.uint8:
            if x.device not in self._normalizers:  # once per device, not a host-to-device copy per batch
                scaled = torch.tensor([MEAN, STD], device=x.device).view(2, 1, -1, 1, 1) * 255
                self._normalizers[x.device] = (scaled[0], scaled[1])
            mean, std = self._normalizers[x.device]
            x = (x.float() - mean) / std
        return (x, *rest)
