"""Name -> network constructor for the recipes (``Classifier(arch=...)``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from lightning_ste.recipes.models.lenet5 import LeNet5
from lightning_ste.recipes.models.resnet_cifar import ResNet20
from lightning_ste.recipes.models.resnet_imagenet import resnet18
from lightning_ste.recipes.models.twolayer import TwoLayer
from lightning_ste.recipes.models.vgg import VGG11

__all__ = ["ARCHITECTURES", "build_network"]

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "twolayer": TwoLayer,
    "lenet5": LeNet5,
    "vgg11": VGG11,
    "resnet20": ResNet20,
    "resnet18": resnet18,
}


def build_network(arch: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build the network ``arch`` with ``num_classes`` outputs; ``kwargs`` go to its constructor."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown `arch` {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch](num_classes=num_classes, **kwargs)
