"""The teacher-student model of YLZ19 §3.1: ``y = v^T sigma(Z w)`` with a binarized ReLU and Gaussian ``Z``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_ste.recipes.hyperparameters import hparams

__all__ = ["TeacherStudent", "TeacherStudentNet"]


class TeacherStudentNet(nn.Module):
    """``f(Z) = v^T sigma(Z w)`` for ``Z`` of shape (m, n): one filter ``w`` in R^n, output weights ``v`` in R^m.

    ``sigma`` is an ``nn.ReLU`` so that ``QuantizeActivations(bits=1, alpha=1.0)`` turns it into the
    binarized ReLU ``1{x > 0}`` of YLZ19 and trains it with a chosen STE.
    """

    def __init__(self, m: int = 20, n: int = 10):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n) / n**0.5)
        self.v = nn.Parameter(torch.randn(m) / m**0.5)
        self.act = nn.ReLU()

    def forward(self, z: Tensor) -> Tensor:
        return self.act(z @ self.w) @ self.v


class TeacherStudent(pl.LightningModule):
    """Fit the student ``(v, w)`` to the teacher's labels with the square loss ``(f(Z) - y)^2 / 2`` (YLZ19 §3.1).

    Logs ``train/loss``, ``val/loss`` and ``val/rel_loss`` (``val/loss`` over the loss of predicting 0).
    """

    def __init__(self, m: int = 20, n: int = 10, lr: float = 0.01, momentum: float = 0.0) -> None:
        super().__init__()
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        self.save_hyperparameters()
        self.net = TeacherStudentNet(m, n)
        self.val_loss = MeanMetric()
        self.val_zero_loss = MeanMetric()

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        z, y = batch
        loss = 0.5 * (self(z) - y).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        z, y = batch
        self.val_loss.update(0.5 * (self(z) - y).pow(2))
        self.val_zero_loss.update(0.5 * y.pow(2))
        self.log("val/loss", self.val_loss, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self.log("val/rel_loss", self.val_loss.compute() / self.val_zero_loss.compute().clamp_min(1e-12))
        self.val_zero_loss.reset()

    def configure_optimizers(self) -> Any:
        hp = hparams(self)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
