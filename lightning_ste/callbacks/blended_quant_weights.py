"""BlendedQuantWeights: binary / ternary / b-bit weights trained with blended coarse gradient descent (BCGD19).

Lifecycle only: the conversion is :mod:`lightning_ste.surgery.weight_params`, the blend step
:mod:`lightning_ste.blend` (docs/math.md).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_ste import recipe as recipe_store
from lightning_ste._compat import attached_trainer
from lightning_ste.blend import (
    RhoSchedule,
    RhoScheduleArg,
    bcgd_blend_,
    grads_finite,
    scaler_found_inf,
)
from lightning_ste.callbacks._interop import (
    after_configure_model,
    auto_pruners_after,
    cancel_after_configure_model,
    example_input,
    latent_parameter,
    pruning_mask,
    quantized_chain,
    recopy_earlier_swa,
    restore_pruning,
    retarget_pruning,
)
from lightning_ste.config import DEFAULT_LAYER_TYPES, WeightQuantConfig, check_bool
from lightning_ste.inspect import quantized_layers
from lightning_ste.quantizers.weight import WeightQuantizer, prepare_weights_
from lightning_ste.surgery.lazy import lazy_modules
from lightning_ste.surgery.weight_params import (
    RECIPE_KIND,
    WeightPlan,
    follow_sites_,
    has_weights_recipe,
    plan_weights,
    set_quantizer_arguments_,
)

__all__ = ["BlendedQuantWeights"]

_LATENT_SUFFIX = ".parametrizations.weight.original"


class BlendedQuantWeights(Callback):
    r"""Quantize the weights of Linear / Conv layers and train them with BCGD, W <- (1 - rho) W + rho q(W) - lr grad (BCGD19).

    Each selected layer's ``weight`` becomes q(W) (binary for ``bits=1``, ternary TWN for 2, symmetric b-bit
    above) through ``torch.nn.utils.parametrize``; the optimizer trains the float latent W
    (``layer.parametrizations.weight.original``) with the gradient taken at q(W). Once per optimizer step,
    before the optimizer applies the gradient, the latent weights are blended
    :math:`W \leftarrow (1-\rho)W + \rho\,q(W)`; ``rho=0`` is BinaryConnect. A step whose gradients are not
    finite (one AMP's GradScaler skips) is not blended. Validation, test, predict and the saved model use
    q of the current latent weights.

    Args:
        bits: weight bits, 1..8.
        rho: the blending parameter ρ in [0, 1] (the starting ρ when ``rho_schedule`` is a pair).
        rho_schedule: ``None`` (constant ρ), a ``(rate, max)`` pair (ρ <- min(ρ·rate, max) at each epoch
            start, as the BCGD19 code does with 1.01 and 0.01), or a callable ``epoch -> rho``.
        include, exclude: glob patterns over module names choosing the layers.
        keep_first_last: keep the first and last weight layer *in execution order* in float (BCGD19's 65.46%
            setting); found with a probe forward on ``example_input_array`` or the first batch.
        per_channel: one scale per output channel instead of one per tensor.
        ternary_scale: ``"twn"`` or ``"bcgd_code"`` (the ternary scale over kept or all entries). binary_scale: ``"mean"`` or ``"median"``.
        layer_types: the layer classes considered.
        dry_run: print the plan and change nothing.
    """

    def __init__(
        self,
        bits: int = 1,
        rho: float = 1e-5,
        rho_schedule: RhoScheduleArg = None,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        keep_first_last: bool = False,
        per_channel: bool = False,
        ternary_scale: str = "twn",
        layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
        binary_scale: str = "mean",
        dry_run: bool = False,
    ) -> None:
        self.config = WeightQuantConfig(
            bits=bits,
            include=include,
            exclude=exclude,
            keep_first_last=keep_first_last,
            per_channel=per_channel,
            ternary_scale=ternary_scale,
            binary_scale=binary_scale,
            layer_types=layer_types,
        )
        self._schedule = RhoSchedule(rho, rho_schedule)
        self.dry_run = check_bool("dry_run", dry_run)
        self._load_hook: RemovableHandle | None = None
        self._plan: WeightPlan | None = (
            None  # this setup's conversion, undone if the run fails before training
        )
        self._layers: list[tuple[Tensor, _BlendTarget]] = []
        self._per_optimizer: dict[int, tuple[tuple[int, int], list[tuple[Tensor, _BlendTarget]]]] = {}
        self._auto_pruners: set[int] = set()
        self._pruning_undo: dict[int, list[tuple[int, nn.Module]]] = {}

    @property
    def rho(self) -> float:
        """The ρ of the current epoch."""
        return self._schedule.rho

    @property
    @override
    def state_key(self) -> str:
        # One per Trainer (its state is the ρ schedule): the bare class name, the key of earlier checkpoints.
        return type(self).__qualname__

    # ------------------------------------------------------------------------------------- lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plan = None
        # Layers built in configure_model (which Lightning calls after every setup) are converted right after it.
        after_configure_model(pl_module, lambda: self._convert(trainer, pl_module, stage))
        if self.dry_run:
            return
        # A ModelPruning set up after this hook discovers parameters itself and cannot see q(W)'s latent W.
        self._auto_pruners |= {id(cb) for cb in auto_pruners_after(trainer, self)}
        # Lightning loads `ckpt_path` after every `setup` hook; this pre-hook lets the checkpoint's layers win.
        self._remove_load_hook()
        self._load_hook = pl_module.register_load_state_dict_pre_hook(self._on_load_state_dict)

    def _convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if has_weights_recipe(pl_module):
            # A second fit/validate/test on the same module, or a module converted by hand: keep it as it is.
            rank_zero_info(
                "BlendedQuantWeights: the module already holds quantized weights; not converting again"
            )
        elif self.dry_run:
            # Lazy modules are initialised on a copy: a dry run leaves the model exactly as it was.
            target = copy.deepcopy(pl_module) if lazy_modules(pl_module) else pl_module
            rank_zero_info(self._planned(trainer, target, stage).format(dry_run=True))
        else:
            plan = self._planned(trainer, pl_module, stage)
            plan.apply(pl_module)
            self._plan = plan
            rank_zero_info(plan.format())
            recopy_earlier_swa(trainer, pl_module, self, stage)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        stored = recipe_store.recipes_of(checkpoint, RECIPE_KIND)
        if self.dry_run or not stored or not recipe_store.recipes_on(pl_module):
            return
        if stored == recipe_store.recipes_on(pl_module, RECIPE_KIND):
            return
        # The quantizers hold no tensors, so adopting the stored arguments after the weights loaded is exact.
        for recipe in stored:
            set_quantizer_arguments_(pl_module, recipe["arguments"], recipe["sites"])
        recipe_store.replace(pl_module, RECIPE_KIND, stored)
        if self._plan is not None:
            # This setup's plan recorded the only weights recipe (a module holding one is not converted).
            self._plan.record_change(lambda: recipe_store.replace(pl_module, RECIPE_KIND, []))
        rank_zero_warn(
            "BlendedQuantWeights: the checkpoint's weights recipe overrides this callback's arguments: "
            f"{[r['arguments'] for r in stored]}"
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._plan = None
        if self.dry_run:
            return
        # Every setup hook has run: ModelPruning's (layer, "weight") entries now become the latent W.
        layers = {id(layer): layer for _, layer, _, _ in quantized_layers(pl_module)}
        self._pruning_undo = retarget_pruning(trainer, layers, self._auto_pruners)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One entry per latent: layers sharing a weight (tied) share it and its quantizer, blended once.
        latents: dict[int, tuple[Tensor, _BlendTarget]] = {}
        for _, layer, _, q in quantized_layers(pl_module):
            chain = quantized_chain(layer)
            latents.setdefault(id(latent_parameter(chain)), (latent_parameter(chain), _BlendTarget(chain, q)))
        self._layers = list(latents.values())
        self._per_optimizer.clear()
        trained = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        idle = [
            name
            for name, layer, _, _ in quantized_layers(pl_module)
            if id(latent_parameter(quantized_chain(layer))) not in trained
        ]
        if idle:
            rank_zero_warn(
                f"BlendedQuantWeights: latent weights of {idle} are in no optimizer: not trained or blended"
            )

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule.start_epoch(trainer.current_epoch)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # q(W) of all binary layers in a few multi-tensor ops (the CUDA path) before the forward, which takes it.
        if self._layers and not self.dry_run:
            prepare_weights_(
                (target.quantizer, w) for w, target in self._layers if pruning_mask(target.chain) is None
            )

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        rho = self._schedule.rho
        if rho == 0.0 or self.dry_run:
            return
        # A latent without a gradient is one the optimizer does not step this time: it is not blended either.
        layers = [(w, q) for w, q in self._layers_of(optimizer) if w.grad is not None]
        if not layers:
            return
        # Gradients are unscaled here (16-mixed); scaler.step skips the step when any is not finite, and so
        # must the blend: it follows the flag unscale_ just computed (on the device, no host sync, no extra pass
        # over the gradients); only when unscale_ has not run (an optimizer that unscales itself) are the
        # gradients checked here. Without a scaler every step is taken.
        finite = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            found_inf = scaler_found_inf(scaler, optimizer)
            if found_inf is not None:
                finite = found_inf == 0
            else:
                finite = grads_finite(p for group in optimizer.param_groups for p in group["params"])
        bcgd_blend_(layers, rho, finite)

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        recipe_store.write(pl_module, checkpoint)

    @override
    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A failure before training starts (another callback's setup, restoring ckpt_path) leaves the model as
        # it was given, not half-converted; once fit has started, the converted model is the run's state.
        cancel_after_configure_model(pl_module)
        if self._plan is not None:
            # The plan recorded the checkpoint's changes to its layers and recipe too: revert undoes them all.
            self._plan.revert()
            self._plan = None
            self._remove_load_hook()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._plan = None
        cancel_after_configure_model(pl_module)
        self._remove_load_hook()
        restore_pruning(trainer, self._pruning_undo)
        self._pruning_undo = {}

    @override
    def state_dict(self) -> dict[str, Any]:
        return self._schedule.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._schedule.load_state_dict(state_dict)

    # --------------------------------------------------------------------------------------- helpers

    def _planned(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> WeightPlan:
        # The probe input serves keep_first_last and lazy modules (nn.LazyLinear, ...), which get their shapes
        # from one forward.
        needs_probe = self.config.keep_first_last or bool(lazy_modules(pl_module))
        example = example_input(trainer, pl_module, stage) if needs_probe else None
        plan = plan_weights(pl_module, self.config, example_input=example)
        plan.title = "BlendedQuantWeights"
        return plan

    def _layers_of(self, optimizer: Optimizer) -> list[tuple[Tensor, _BlendTarget]]:
        """The (latent, q) pairs this optimizer steps, cached until its param groups change."""
        key = (len(optimizer.param_groups), sum(len(g["params"]) for g in optimizer.param_groups))
        cached = self._per_optimizer.get(id(optimizer))
        if cached is None or cached[0] != key:
            ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
            cached = (key, [(w, q) for w, q in self._layers if id(w) in ids])
            self._per_optimizer[id(optimizer)] = cached
        return cached[1]

    def _remove_load_hook(self) -> None:
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None

    def _on_load_state_dict(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
    ) -> None:
        """Make the quantized layers those of the incoming state dict (a `ckpt_path` restore), before it loads."""
        current = [name for name, *_ in quantized_layers(module)]
        stored = [
            k[len(prefix) : -len(_LATENT_SUFFIX)]
            for k in state_dict
            if k.startswith(prefix) and k.endswith(_LATENT_SUFFIX)
        ]
        if set(stored) == set(current):
            return
        trainer = attached_trainer(module)
        if not stored:
            if trainer is not None and trainer.state.fn == "fit":
                raise ValueError(
                    "`ckpt_path` holds float weights for the layers BlendedQuantWeights quantizes, and its optimizer "
                    "state does not fit the quantized parameters: load the float weights with "
                    "`model.load_state_dict(torch.load(path)['state_dict'])` before `fit` instead"
                )
            # Evaluating a float checkpoint: its weights become the latent W of the quantized layers.
            for name in current:
                key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
                if key in state_dict:
                    state_dict[f"{prefix}{name}{_LATENT_SUFFIX}"] = state_dict.pop(key)
            rank_zero_info(
                "BlendedQuantWeights: loading float weights into the latent weights of the quantized layers"
            )
            return
        if trainer is not None and trainer.optimizers:
            raise ValueError(
                f"the checkpoint quantizes the weights of {sorted(stored)} but this run quantizes {sorted(current)}, "
                "and the optimizers already exist: construct BlendedQuantWeights with the checkpoint's arguments"
            )
        if self._plan is not None:
            self._plan.follow_(module, stored)  # recorded in the plan, so a failing run reverts it too
        else:
            follow_sites_(module, stored, self.config)
        rank_zero_warn(
            f"BlendedQuantWeights: following the checkpoint, the quantized layers are {stored} (this callback's "
            f"arguments selected {current})"
        )


class _BlendTarget:
    """q of the weight the model uses: q(W ⊙ M) while ModelPruning holds a mask M on the latent W."""

    def __init__(self, chain: nn.Module, quantizer: WeightQuantizer) -> None:
        self.chain, self.quantizer = chain, quantizer

    def __call__(self, w: Tensor) -> Tensor:
        mask = pruning_mask(self.chain)
        return self.quantizer.quantize(w if mask is None else w * mask)

    def fused_blend_(self, w: Tensor, rho: float | Tensor) -> bool:
        return pruning_mask(self.chain) is None and self.quantizer.fused_blend_(w, rho)

    def for_blend(self, w: Tensor) -> Tensor:
        return self.quantizer.for_blend(w) if pruning_mask(self.chain) is None else self(w)
