"""Synthetic data: orthogonal subspaces (LYX21, docs/math.md §4) and teacher-student Gaussian data (YLZ19 §3.1)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_ste.recipes.data.common import ResumableDataModule
from lightning_ste.recipes.hyperparameters import hparams

__all__ = [
    "OrthogonalSubspacesDataModule",
    "TeacherStudentDataModule",
    "orthogonal_subspaces",
    "teacher_student",
]


def orthogonal_subspaces(
    num_classes: int, dim: int, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` points of R^(K*d): class k lives in coordinates ``k*d .. (k+1)*d - 1``, N(0, I_d) there (docs/math.md §4).

    The classes are zero-mean and their subspaces mutually orthogonal, so no linear classifier separates
    them while a two-linear-layer network with a (quantized) ReLU can (LYX21's setting; the exact data is ours).
    """
    y = torch.randint(num_classes, (n,), generator=generator)
    z = torch.randn(n, dim, generator=generator)
    x = torch.zeros(n, num_classes, dim)
    x[torch.arange(n), y] = z
    return x.reshape(n, num_classes * dim), y


def teacher_student(
    w_star: Tensor, v_star: Tensor, n: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``n`` samples ``Z`` (m x n_in, i.i.d. N(0, 1)) with labels ``y = v*^T 1{Z w* > 0}`` (YLZ19 §3.1)."""
    z = torch.randn(n, v_star.numel(), w_star.numel(), generator=generator, dtype=w_star.dtype)
    return z, (z @ w_star > 0).to(v_star.dtype) @ v_star


class OrthogonalSubspacesDataModule(ResumableDataModule):
    """K classes in mutually orthogonal d-dim subspaces of R^(K*d), Gaussian inside each (LYX21, docs/math.md §4).

    Validation uses a second sample of the same law, or with ``val_on_train=True`` the training sample itself,
    so that ``val/acc`` is the training accuracy (in eval mode) that LYX21 proves reachable (100%) for
    monotone STEs.
    """

    VAL_BATCH_SIZE = 1000

    def __init__(
        self,
        num_classes: int = 10,
        dim: int = 5,
        n_train: int = 2000,
        n_val: int = 2000,
        batch_size: int = 100,
        val_on_train: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("num_classes", num_classes),
            ("dim", dim),
            ("n_train", n_train),
            ("n_val", n_val),
        ):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        self.save_hyperparameters()

    @property
    def in_features(self) -> int:
        hp = hparams(self)
        return hp.num_classes * hp.dim

    def setup(self, stage: str | None = None) -> None:
        hp = hparams(self)
        g = torch.Generator().manual_seed(hp.seed)
        self.train_data = orthogonal_subspaces(hp.num_classes, hp.dim, hp.n_train, g)
        held_out = orthogonal_subspaces(hp.num_classes, hp.dim, hp.n_val, g)
        self.val_data = self.train_data if hp.val_on_train else held_out


class TeacherStudentDataModule(ResumableDataModule):
    """Gaussian ``Z`` (m x n) with teacher labels ``v*^T 1{Z w* > 0}``, ``|w*| = 1`` (YLZ19 §3.1)."""

    VAL_BATCH_SIZE = 10000

    def __init__(
        self,
        m: int = 20,
        n: int = 10,
        n_train: int = 1000,
        n_val: int = 10000,
        batch_size: int = 1000,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if m < 1 or n < 1 or n_train < 1 or n_val < 1:
            raise ValueError(f"`m`, `n`, `n_train`, `n_val` must be >= 1, got {m}, {n}, {n_train}, {n_val}")
        self.save_hyperparameters()
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, generator=g)
        self.w_star, self.v_star = w / w.norm(), torch.randn(m, generator=g)
        self._generator_seed = seed + 1

    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(self._generator_seed)
        self.train_data = teacher_student(self.w_star, self.v_star, hparams(self).n_train, g)
        self.val_data = teacher_student(self.w_star, self.v_star, hparams(self).n_val, g)
