"""QuantSummary: print the bit-aware :func:`~lightning_ste.summary` of the model when fit starts."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ste.bit_summary import QuantModelSummary, summary

__all__ = ["QuantSummary"]


class QuantSummary(Callback):
    """Print the bit-aware :func:`summary` of the model at fit start (like Lightning's ``ModelSummary``).

    Runs in ``on_fit_start``, after the conversion callbacks rewrote the model in ``setup``; the last
    summary stays available as ``self.last_summary``.
    """

    def __init__(self) -> None:
        self.last_summary: QuantModelSummary | None = None

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self.last_summary = summary(pl_module)
        rank_zero_info("\n" + str(self.last_summary))
