"""Recipe data modules: synthetic (LYX21, YLZ19), MNIST, CIFAR-10, ImageNet. ``root`` defaults to
``$LIGHTNING_STE_DATA`` or ``./data``."""

from lightning_ste.recipes.data.cifar10 import CIFAR10DataModule
from lightning_ste.recipes.data.common import DATA_ENV, resolve_root
from lightning_ste.recipes.data.imagenet import ImageNetDataModule
from lightning_ste.recipes.data.mnist import MNISTDataModule
from lightning_ste.recipes.data.synthetic import OrthogonalSubspacesDataModule, TeacherStudentDataModule

__all__ = [
    "CIFAR10DataModule",
    "DATA_ENV",
    "ImageNetDataModule",
    "MNISTDataModule",
    "OrthogonalSubspacesDataModule",
    "TeacherStudentDataModule",
    "resolve_root",
]
