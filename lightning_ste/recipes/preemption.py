"""Preemption: a checkpoint saved when the process gets SIGTERM, so ``fit --ckpt_path`` resumes the run."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = ["EXIT_SIGTERM", "SaveOnSigterm", "take_saved_checkpoint"]

EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process stopped by SIGTERM

_SAVED: dict[
    str, str
] = {}  # the checkpoint SaveOnSigterm wrote in this process, for the command's last words


def take_saved_checkpoint() -> str | None:
    """The checkpoint :class:`SaveOnSigterm` wrote in this process (once: it is forgotten after this call)."""
    return _SAVED.pop("checkpoint", None)


class SaveOnSigterm(Callback):
    """Save a checkpoint when the process gets SIGTERM (what SLURM and Kubernetes send before they kill a job).

    Lightning turns SIGTERM into a stop after the current training batch (``trainer.received_sigterm``); this
    callback first writes the state at the end of that batch, like a step checkpoint of ``ModelCheckpoint``,
    to ``<dirpath>/last.ckpt`` (``dirpath`` defaults to the trainer's ModelCheckpoint folder, else its
    ``default_root_dir``), so ``fit --ckpt_path <dirpath>/last.ckpt`` resumes from that step. In DDP the ranks
    agree on the decision (one all-reduce of a flag per step).
    """

    def __init__(self, dirpath: str | None = None, filename: str = "last.ckpt") -> None:
        self.dirpath, self.filename = dirpath, filename
        self.saved_path: str | None = None

    def _path(self, trainer: pl.Trainer) -> str:
        ckpt = trainer.checkpoint_callback
        folder = self.dirpath or (getattr(ckpt, "dirpath", None) if ckpt is not None else None)
        return os.path.join(folder or trainer.default_root_dir, self.filename)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        received = trainer.received_sigterm
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if not received or self.saved_path is not None:
            return
        path = self._path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = _SAVED["checkpoint"] = path
        rank_zero_info(
            f"SIGTERM received: saved {path} (step {trainer.global_step}); the run stops after this batch. "
            f"Resume with the same command plus --ckpt_path {path}"
        )
