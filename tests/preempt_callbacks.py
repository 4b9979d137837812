"""A callback that signals its own process at a given step: a preemption at a known point of a real CLI run.

Used by tests/test_preemption.py through ``--trainer.callbacks+=`` (not a test module itself).
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl


class SignalAt(pl.Callback):
    """Send ``signum`` (9 = SIGKILL, 15 = SIGTERM) to this process when optimizer step ``step`` has finished."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)
