"""QuantizeActivations: every ReLU of a LightningModule becomes a b-bit staircase ReLU alpha * clamp(ceil(x / alpha), 0, L) (YLZ19, BCGD19; docs/math.md §1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_ste import _compat, recipe
from lightning_ste.callbacks._interop import (
    after_configure_model,
    cancel_after_configure_model,
    recopy_earlier_swa,
)
from lightning_ste.config import ALPHA_FLOOR, ActivationQuantConfig, check_bool
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.surgery.activation_plan import ActivationPlan, plan_activations

__all__ = ["QuantizeActivations"]


class QuantizeActivations(Callback):
    """Turn the ReLUs of the LightningModule into b-bit QuantReLUs trained with a straight-through estimator.

    Args:
        bits: bits of the activations, 1..8 (``L = 2**bits - 1`` levels above zero).
        ste: the straight-through estimator's name (``lightning_ste.ste.available()``).
        alpha: ``"learned"`` (init ``half_gaussian_resolution(bits)``, trained with the BCGD19 proxy),
            ``"fixed"`` (that value, frozen), ``"calibrate"`` (``max|x| / L`` over the first
            ``calibration_batches`` training batches, then frozen) or a number > 0 (frozen).
        alpha_grad: the proxy of d sigma / d alpha: ``"ae"``, ``"mean"``, ``"min"`` or ``"pact"`` (BCGD19).
        alpha_lr_scale: r in ``d loss / d alpha = clamp(r * sum(...), -1, 1)``.
        rounding: ``"ceil"`` (the papers' code) or ``"nearest"``.
        include, exclude: glob patterns over the site names printed in the plan.
        calibration_batches: training batches used by ``alpha="calibrate"``.
        dry_run: print the plan at setup and change nothing.
        targets: the activations converted: ``("relu",)``, or ``("relu", "relu6")`` to also turn ReLU6 into
            the staircase capped at 6 (``alpha = 6 / L`` fixed, the clipped ReLU with a fixed top).

    The model is converted in ``setup``, or right after ``LightningModule.configure_model`` when the module
    overrides it (before ``configure_optimizers``, strategy wrapping and checkpoint restore), once: a second fit/validate/test on the same objects finds the recipe and does not convert
    again. Learned alphas that the user's optimizer does not hold are added to its first optimizer as one
    param group with weight decay 0. The recipe goes into every checkpoint, so ``trainer.fit(...,
    ckpt_path=...)`` with fresh objects and :func:`lightning_ste.load_from_checkpoint` rebuild the model.
    """

    def __init__(
        self,
        bits: int = 4,
        ste: str = "clipped_relu",
        alpha: str | float = "learned",
        alpha_grad: str = "mean",
        alpha_lr_scale: float = 0.01,
        rounding: str = "ceil",
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        calibration_batches: int = 1,
        dry_run: bool = False,
        targets: Sequence[str] = ("relu",),
    ) -> None:
        self.config = ActivationQuantConfig(
            bits=bits,
            ste=ste,
            alpha=alpha,
            alpha_grad=alpha_grad,
            alpha_lr_scale=alpha_lr_scale,
            rounding=rounding,
            include=include,
            exclude=exclude,
            calibration_batches=calibration_batches,
            targets=targets,
        )
        self.dry_run = check_bool("dry_run", dry_run)
        self.sites: list[str] = []
        self._announced_param_group = False
        self._calibrating: list[tuple[QuantReLU, int]] = []
        self._at_floor: set[str] = set()  # sites already warned about, so each is named once
        self._floor_checked_at = -1
        self._plan: ActivationPlan | None = None  # this setup's conversion, undone if the run fails early

    @property
    @override
    def state_key(self) -> str:
        return _compat.callback_state_key(self, **self.config.to_dict())

    def _quantizers(self, pl_module: nn.Module) -> list[QuantReLU]:
        return [cast(QuantReLU, pl_module.get_submodule(name)) for name in self.sites]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plan = None
        # Layers built in configure_model (which Lightning calls after every setup) are converted right after it.
        after_configure_model(pl_module, lambda: self._convert(trainer, pl_module, stage))

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        found = recipe.find(pl_module, ActivationPlan.kind, self.config.to_dict())
        if found is not None:  # converted by an earlier fit/validate/test (or by hand, same arguments)
            self.sites = list(found["sites"])
            return
        # The plan is computed in full before the model is touched: a bad pattern leaves it unchanged.
        plan = plan_activations(pl_module, self.config)
        if (message := plan.warning()) is not None:
            rank_zero_warn(message)
        rank_zero_info(plan.format(dry_run=self.dry_run))
        if not self.dry_run:
            self.sites = plan.apply(pl_module)
            self._plan = plan
            recopy_earlier_swa(trainer, pl_module, self, stage)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A failure before training starts (another callback's setup, restoring ckpt_path) leaves the model as
        # it was given, not half-converted; once fit has started, the converted model is the run's state.
        cancel_after_configure_model(pl_module)
        if self._plan is not None:
            self._plan.revert()
            self._plan, self.sites = None, []

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plan = None
        cancel_after_configure_model(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan = None
        # Optimizers exist now (strategy.setup); their state is restored from a checkpoint only after this
        # hook, so a param group added here is there again, in the same place, when a run resumes.
        alphas = [q.alpha for q in self._quantizers(pl_module) if isinstance(q.alpha, nn.Parameter)]
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [a for a in alphas if a.requires_grad and id(a) not in held]
        if not missing:
            return
        if not trainer.optimizers:
            rank_zero_warn(
                f"QuantizeActivations: no optimizer, so {len(missing)} learned alpha(s) will not train."
            )
            return
        optimizer = trainer.optimizers[0]
        optimizer.add_param_group({"params": missing, "weight_decay": 0.0})
        group = optimizer.param_groups[-1]
        if "initial_lr" in optimizer.param_groups[0]:
            group["initial_lr"] = group["lr"]
        for config in trainer.lr_scheduler_configs:
            _extend_scheduler(config.scheduler, optimizer)
        if not self._announced_param_group:
            self._announced_param_group = True
            rank_zero_warn(
                f"QuantizeActivations: {len(missing)} learned alpha(s) were in no optimizer param group; added"
                f" them to optimizer 0 as a new param group (lr={group['lr']}, weight_decay=0)."
            )

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._calibrating = [(q, q.calibrated_batches) for q in self._quantizers(pl_module) if q.calibrating]

    @override
    @torch.no_grad()
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        changed = [q for q, count in self._calibrating if q.calibrated_batches != count]
        self._calibrating = []
        if changed and trainer.world_size > 1:
            # Each rank saw a slice of the global batch: alpha = max|x| / L over all of it.
            gathered = trainer.strategy.all_gather(torch.stack([q.alpha.detach() for q in changed]))
            for q, value in zip(changed, gathered.reshape(-1, len(changed)).amax(0)):
                q.alpha.copy_(value)
        # Reading alpha is a host sync on an accelerator: only on logging steps (and at epoch end).
        step = trainer.global_step
        every = trainer.log_every_n_steps  # type: ignore[attr-defined]  # set by Lightning's logger connector
        if step != self._floor_checked_at and step % max(every, 1) == 0:
            self._floor_checked_at = step
            self._warn_alpha_floor(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_alpha_floor(pl_module)

    @torch.no_grad()
    def _warn_alpha_floor(self, pl_module: pl.LightningModule) -> None:
        """Warn once per site whose alpha is at or below the floor the forward clamps it to (one host read)."""
        watched = [(n, q) for n, q in zip(self.sites, self._quantizers(pl_module)) if n not in self._at_floor]
        if not watched:
            return
        device = watched[0][1].alpha.device
        values = torch.stack([q.alpha.detach().float().to(device) for _, q in watched])
        low = [n for (n, _), hit in zip(watched, values.le(ALPHA_FLOOR).tolist()) if hit]
        if low:
            self._at_floor.update(low)
            rank_zero_warn(
                f"QuantizeActivations: alpha of {', '.join(low)} collapsed to its floor {ALPHA_FLOOR:g} (the forward "
                "clamps it there, so the site outputs almost only 0 and multiples of the floor). Lower the learning "
                "rate of alpha or `alpha_lr_scale`, or use alpha='calibrate' or a fixed value."
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        recipe.write(pl_module, checkpoint)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"arguments": self.config.to_dict(), "sites": list(self.sites)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"arguments", "sites"}:
            keys = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
            raise ValueError(
                f"QuantizeActivations state must have exactly the keys ['arguments', 'sites'], got {keys}"
            )
        sites = list(state_dict["sites"])
        if self.sites and sites and sites != self.sites:
            rank_zero_warn(
                f"QuantizeActivations: the checkpoint was made with sites {sites}, this run converted {self.sites}."
            )


def _extend_scheduler(scheduler: Any, optimizer: torch.optim.Optimizer) -> None:
    """Give a scheduler of ``optimizer`` an entry for the param group just added (it only knew the others)."""
    if getattr(scheduler, "optimizer", None) is not optimizer:
        return
    n = len(optimizer.param_groups)
    base_lrs = getattr(scheduler, "base_lrs", None)
    if isinstance(base_lrs, list) and len(base_lrs) == n - 1:
        base_lrs.append(optimizer.param_groups[-1].get("initial_lr", optimizer.param_groups[-1]["lr"]))
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if isinstance(lambdas, list) and len(lambdas) == n - 1 and lambdas:
        lambdas.append(lambdas[-1])
