"""torchvision ResNet-18 for ImageNet, optionally from torchvision's float weights (BCGD19 recipes)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

__all__ = ["resnet18"]


def _local_weights(weights: str) -> Path | None:
    """The torch hub cache file of a torchvision weights enum member, when it is already on disk."""
    member = torchvision.models.get_weight(f"ResNet18_Weights.{weights}")
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(member.url)
    return path if path.exists() else None


def resnet18(
    num_classes: int = 1000, weights: str | None = None, download_weights: bool = False
) -> nn.Module:
    """torchvision ResNet-18; ``weights`` (e.g. ``"IMAGENET1K_V1"``) loads torchvision's float weights.

    The weights are read from the torch hub cache; with ``download_weights=True`` they are fetched when
    missing. When they are neither cached nor downloadable the network starts from random init with a warning.
    """
    model = torchvision.models.resnet18(num_classes=num_classes)
    if weights is None:
        return model
    if _local_weights(weights) is None and not download_weights:
        warnings.warn(
            f"torchvision ResNet18_Weights.{weights} not found in {torch.hub.get_dir()}/checkpoints and "
            "download_weights=False: starting from random init",
            stacklevel=2,
        )
        return model
    member = torchvision.models.get_weight(f"ResNet18_Weights.{weights}")
    try:
        state = member.get_state_dict(progress=False)
    except Exception as err:  # no network: fall back to random init, loudly
        warnings.warn(
            f"could not load torchvision ResNet18_Weights.{weights} ({err}): random init", stacklevel=2
        )
        return model
    if num_classes != 1000:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    # Strict but for the classifier a different num_classes replaces: any other missing or unexpected key fails.
    result = model.load_state_dict(state, strict=False)
    head = {"fc.weight", "fc.bias"} if num_classes != 1000 else set()
    missing = [k for k in result.missing_keys if k not in head]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"torchvision ResNet18_Weights.{weights} does not fit the network: missing keys {missing}, "
            f"unexpected keys {result.unexpected_keys}"
        )
    return model
