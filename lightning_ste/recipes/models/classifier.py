"""``Classifier``: the LightningModule of every classification recipe (cross-entropy, SGD, multistep LR)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lightning_ste.recipes.hyperparameters import hparams
from lightning_ste.recipes.models.registry import ARCHITECTURES, build_network

__all__ = ["Classifier", "load_float_weights"]

OPTIMIZERS = ("sgd", "adam")


def load_float_weights(module: nn.Module, path: str | Path, prefix: str = "net.") -> None:
    """Load float weights from a Lightning checkpoint (or a plain state_dict) into ``module``, strictly.

    Keys of a Lightning checkpoint of the same ``Classifier`` match as they are; a plain state_dict of the
    bare network matches after ``prefix`` is added. Missing or unexpected keys raise ``RuntimeError``.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if isinstance(ckpt, dict) and ckpt.get("lightning_ste", {}).get("recipes"):
        raise ValueError(
            f"`init_from` {str(path)!r} holds an already quantized model; give the float checkpoint "
            "(use lightning_ste.load_from_checkpoint to load a quantized one)"
        )
    own = module.state_dict()
    if not any(k in own for k in state) and prefix:
        state = {prefix + k: v for k, v in state.items()}
    module.load_state_dict(state, strict=True)


class Classifier(pl.LightningModule):
    """Image/vector classifier around a network of :mod:`lightning_ste.recipes.models` (YLZ19, BCGD19, LYX21 recipes).

    Logs ``train/loss`` (every ``log_every_n_steps`` steps), ``train/acc`` (per epoch), ``val/loss``,
    ``val/acc`` (and ``val/acc_top5`` with ``top5=True``) through torchmetrics; SGD (momentum, weight decay)
    or Adam with a step-wise ``MultiStepLR`` at ``milestones`` (epochs). ``init_from`` loads float weights at
    construction, before the quantization callbacks convert the network in ``setup`` (the papers start every
    quantized run from a float model).
    """

    def __init__(
        self,
        arch: str = "lenet5",
        arch_kwargs: dict[str, Any] | None = None,
        num_classes: int = 10,
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        label_smoothing: float = 0.0,
        top5: bool = False,
        channels_last: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown `arch` {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown `optimizer` {optimizer!r}; allowed: {', '.join(OPTIMIZERS)}")
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr!r}")
        if sorted(milestones) != list(milestones) or any(int(m) < 0 for m in milestones):
            raise ValueError(f"`milestones` must be increasing epochs >= 0, got {list(milestones)!r}")
        # init_from is a training-time input: a model rebuilt from a checkpoint must not need that file.
        self.save_hyperparameters(ignore=["init_from"])
        self.net = build_network(arch, num_classes=num_classes, **(arch_kwargs or {}))
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=5, average="micro") if top5 else None
        self.val_loss = MeanMetric()
        if init_from:
            load_float_weights(self, init_from)

    def forward(self, x: Tensor) -> Tensor:
        if hparams(self).channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=hparams(self).label_smoothing)
        # update() only: the per-batch accuracy is not needed, and logging the metric object every step costs
        # Lightning a move of its whole state per step (about a millisecond, a tenth of a LeNet-5 step).
        self.train_acc.update(logits.detach(), y)
        # Logged on the steps the logger writes: Lightning's self.log costs about half a millisecond per call on
        # the CPU, a twentieth of a LeNet-5 step (so the progress bar's loss refreshes at that rate too).
        trainer = (
            self.trainer
        )  # both attributes are set at run time, so Lightning's stubs do not declare them
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]
        if (self.global_step + 1) % max(every, 1) == 0 or trainer.fast_dev_run:  # type: ignore[attr-defined]
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/acc", self.train_acc)  # computed, then reset by Lightning

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss.update(F.cross_entropy(logits, y), weight=y.numel())
        self.val_acc(logits, y)
        self.log(f"{stage}/loss", self.val_loss, prog_bar=stage == "val")
        self.log(f"{stage}/acc", self.val_acc, prog_bar=stage == "val")
        if self.val_acc_top5 is not None:
            self.val_acc_top5(logits, y)
            self.log(f"{stage}/acc_top5", self.val_acc_top5)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = hparams(self)
        params = [p for p in self.parameters() if p.requires_grad]
        opt: torch.optim.Optimizer
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(
                params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
            )
        else:
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
