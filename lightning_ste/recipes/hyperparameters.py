"""Typed access to the hyperparameters the recipe models and data modules store with ``save_hyperparameters``."""

from __future__ import annotations

from typing import cast

import lightning.pytorch as pl
from lightning.pytorch.utilities.parsing import AttributeDict

__all__ = ["hparams"]


def hparams(owner: pl.LightningModule | pl.LightningDataModule) -> AttributeDict:
    """``owner.hparams``: the AttributeDict ``save_hyperparameters`` fills (Lightning types the property as a
    plain MutableMapping, which has no attribute access)."""
    return cast(AttributeDict, owner.hparams)
