"""MNIST held as decoded tensors in memory (fast on a few CPU cores: no per-sample PIL transform)."""

from __future__ import annotations

from torch import Tensor
from torchvision.datasets import MNIST

from lightning_ste.recipes.data.common import ResumableDataModule, resolve_root, subset_indices
from lightning_ste.recipes.hyperparameters import hparams

__all__ = ["MNISTDataModule"]

MEAN, STD = 0.1307, 0.3081


class MNISTDataModule(ResumableDataModule):
    """MNIST train (60k) and test (10k, used for validation as in the papers), normalized, in memory.

    ``root`` holds ``MNIST/raw`` (torchvision layout; downloaded there when missing and ``download=True``);
    None means ``$LIGHTNING_STE_DATA`` or ``./data``. ``subset``/``val_subset`` keep a seeded random subset.
    ``flatten=True`` serves 784-vectors (two-linear-layer network).
    """

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 64,
        val_batch_size: int = 1000,
        subset: int | None = None,
        val_subset: int | None = None,
        flatten: bool = False,
        download: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise ValueError(
                f"`batch_size` and `val_batch_size` must be >= 1, got {batch_size}, {val_batch_size}"
            )
        self.save_hyperparameters()
        self.root = resolve_root(root)

    def prepare_data(self) -> None:
        for train in (True, False):
            try:
                MNIST(str(self.root), train=train, download=hparams(self).download)
            except RuntimeError as err:  # torchvision: "Dataset not found. You can use download=True ..."
                raise FileNotFoundError(
                    f"MNIST not found under {str(self.root)!r} (expected {self.root / 'MNIST' / 'raw'}): pass "
                    "--data.root FOLDER (the folder holding MNIST/raw) or --data.download true"
                ) from err

    def _load(self, train: bool, size: int | None) -> tuple[Tensor, Tensor]:
        ds = MNIST(str(self.root), train=train, download=False)
        x, y = ds.data, ds.targets
        idx = subset_indices(len(y), size, hparams(self).seed)
        if idx is not None:
            x, y = x[idx], y[idx]
        x = (x.float().div_(255.0) - MEAN) / STD
        x = x.reshape(len(x), -1) if hparams(self).flatten else x.unsqueeze(1)
        return x.contiguous(), y.long()

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_data = self._load(True, hparams(self).subset)
        self.val_data = self._load(False, hparams(self).val_subset)
