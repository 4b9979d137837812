"""BlendedQuantWeights: binary / ternary / b-bit weights trained with blended coarse gradient descent (BCGD19)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

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
    latent_parameter,
    pruning_mask,
    recopy_earlier_swa,
    restore_pruning,
    retarget_pruning,
)
from lightning_ste.modules import prepare_weights_
from lightning_ste.weights import (
    DEFAULT_LAYER_TYPES,
    RECIPE_KIND,
    RECIPES_ATTR,
    apply_plan,
    check_weight_args,
    convert_sites_,
    has_weights_recipe,
    lazy_modules,
    plan_weights,
    quantized_layers,
    remove_quantization_,
    set_quantizer_arguments_,
)

__all__ = ["BlendedQuantWeights"]

_LATENT_SUFFIX = ".parametrizations.weight.original"
_STAGE_LOOPS = {
    "fit": "fit_loop",
    "validate": "validate_loop",
    "test": "test_loop",
    "predict": "predict_loop",
}


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
        self._include, self._exclude, self._layer_types = check_weight_args(
            bits, per_channel, ternary_scale, binary_scale, keep_first_last, include, exclude, layer_types
        )
        self._schedule = RhoSchedule(rho, rho_schedule)
        if not isinstance(dry_run, bool):
            raise ValueError(f"`dry_run` must be a bool, got {dry_run!r}")
        self.bits, self.per_channel, self.keep_first_last = bits, per_channel, keep_first_last
        self.ternary_scale, self.binary_scale, self.dry_run = ternary_scale, binary_scale, dry_run
        self._load_hook: RemovableHandle | None = None
        self._applied = False  # this setup converted the model: undone if the run fails before training
        self._layers: list[tuple[Tensor, Callable[[Tensor], Tensor]]] = []
        self._per_optimizer: dict[
            int, tuple[tuple[int, int], list[tuple[Tensor, Callable[[Tensor], Tensor]]]]
        ] = {}
        self._auto_pruners: set[int] = set()
        self._pruning_undo: dict[int, list[tuple[int, nn.Module]]] = {}

    @property
    def rho(self) -> float:
        """The ρ of the current epoch."""
        return self._schedule.rho

    # ------------------------------------------------------------------------------------- lifecycle

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._applied = False
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
            plan = self._plan(trainer, target, stage)
            rank_zero_info(plan.format("BlendedQuantWeights (dry run, nothing changed)"))
        else:
            plan = self._plan(trainer, pl_module, stage)
            apply_plan(pl_module, plan)
            self._applied = True
            rank_zero_info(plan.format("BlendedQuantWeights"))
            recopy_earlier_swa(trainer, pl_module, self, stage)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        stored = [
            r
            for r in (checkpoint.get("lightning_ste") or {}).get("recipes") or []
            if r.get("kind") == RECIPE_KIND
        ]
        recipes = getattr(pl_module, RECIPES_ATTR, None)
        if self.dry_run or not stored or recipes is None:
            return
        mine = [r for r in recipes if r.get("kind") == RECIPE_KIND]
        if stored == mine:
            return
        # The quantizers hold no tensors, so adopting the stored arguments after the weights loaded is exact.
        for recipe in stored:
            set_quantizer_arguments_(pl_module, recipe["arguments"], recipe["sites"])
        at = next((i for i, r in enumerate(recipes) if r.get("kind") == RECIPE_KIND), len(recipes))
        recipes[:] = [r for r in recipes if r.get("kind") != RECIPE_KIND]
        recipes[at:at] = copy.deepcopy(stored)
        rank_zero_warn(
            "BlendedQuantWeights: the checkpoint's weights recipe overrides this callback's arguments: "
            f"{[r['arguments'] for r in stored]}"
        )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._applied = False
        if self.dry_run:
            return
        # Every setup hook has run: ModelPruning's (layer, "weight") entries now become the latent W.
        layers = {id(layer): layer for _, layer, _, _ in quantized_layers(pl_module)}
        self._pruning_undo = retarget_pruning(trainer, layers, self._auto_pruners)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One entry per latent: layers sharing a weight (tied) share it and its quantizer, blended once.
        latents: dict[int, tuple[Tensor, Callable[[Tensor], Tensor]]] = {}
        for _, layer, _, q in quantized_layers(pl_module):
            latent = latent_parameter(layer.parametrizations.weight)
            latents.setdefault(id(latent), (latent, _BlendTarget(layer.parametrizations.weight, q)))
        self._layers = list(latents.values())
        self._per_optimizer.clear()
        trained = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        idle = [
            name
            for name, layer, _, _ in quantized_layers(pl_module)
            if id(latent_parameter(layer.parametrizations.weight)) not in trained
        ]
        if idle:
            rank_zero_warn(
                f"BlendedQuantWeights: latent weights of {idle} are in no optimizer: not trained or blended"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._schedule.start_epoch(trainer.current_epoch)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # q(W) of all binary layers in a few multi-tensor ops (the CUDA path) before the forward, which takes it.
        if self._layers and not self.dry_run:
            prepare_weights_(
                (target.quantizer, w) for w, target in self._layers if pruning_mask(target.chain) is None
            )

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

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        recipes = getattr(pl_module, RECIPES_ATTR, None)
        if recipes:
            checkpoint["lightning_ste"] = {"recipes": copy.deepcopy(recipes)}

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A failure before training starts (another callback's setup, restoring ckpt_path) leaves the model as
        # it was given, not half-converted; once fit has started, the converted model is the run's state.
        cancel_after_configure_model(pl_module)
        if self._applied:
            # This setup found no quantized weights, so none is the state to go back to (a checkpoint's recipe
            # may have changed the layers since).
            self._applied = False
            remove_quantization_(pl_module)
            recipes = getattr(pl_module, RECIPES_ATTR, [])
            recipes[:] = [r for r in recipes if r.get("kind") != RECIPE_KIND]
            if not recipes:
                pl_module.__dict__.pop(RECIPES_ATTR, None)
            self._remove_load_hook()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._applied = False
        cancel_after_configure_model(pl_module)
        self._remove_load_hook()
        restore_pruning(trainer, self._pruning_undo)
        self._pruning_undo = {}

    def state_dict(self) -> dict[str, Any]:
        return self._schedule.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._schedule.load_state_dict(state_dict)

    # --------------------------------------------------------------------------------------- helpers

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str):
        # The probe input serves keep_first_last and lazy modules (nn.LazyLinear, ...), which get their shapes
        # from one forward.
        needs_probe = self.keep_first_last or bool(lazy_modules(pl_module))
        example = self._example_input(trainer, pl_module, stage) if needs_probe else None
        return plan_weights(
            pl_module,
            bits=self.bits,
            include=self._include,
            exclude=self._exclude,
            keep_first_last=self.keep_first_last,
            per_channel=self.per_channel,
            ternary_scale=self.ternary_scale,
            binary_scale=self.binary_scale,
            layer_types=self._layer_types,
            example_input=example,
        )

    @staticmethod
    def _example_input(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
        """Model input for the keep_first_last probe: ``example_input_array``, else the first batch's input."""
        if pl_module.example_input_array is not None:
            return pl_module.example_input_array
        loop = getattr(trainer, _STAGE_LOOPS.get(str(stage), "fit_loop"), None)
        source = getattr(loop, "_data_source", None)
        loader = None
        if source is not None and source.instance is not None and source.is_defined():
            loader = source.dataloader()
        elif trainer.datamodule is not None and stage == "fit":
            loader = trainer.datamodule.train_dataloader()
        while isinstance(loader, (list, tuple)) and loader:
            loader = loader[0]
        if isinstance(loader, dict) and loader:
            loader = next(iter(loader.values()))
        if loader is None:
            raise ValueError(
                "`keep_first_last=True` and lazy modules need one batch at setup (to find the first and last layer "
                "in execution order, or the lazy layers' shapes): set `example_input_array` on the LightningModule "
                "or give the Trainer a dataloader"
            )
        # The batch the model will see: through the same transfer hooks (a data module's on_after_batch_transfer
        # may normalise uint8 images, as ImageNetDataModule does).
        batch = pl_module._apply_batch_transfer_handler(next(iter(loader)))
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            return batch[0]
        raise ValueError(
            "`keep_first_last=True`: cannot tell the model input in a batch of type "
            f"{type(batch).__name__}; set `example_input_array` on the LightningModule"
        )

    def _layers_of(self, optimizer: Optimizer) -> list[tuple[Tensor, Callable[[Tensor], Tensor]]]:
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
        trainer = getattr(module, "_trainer", None)
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
        arguments = {"bits": self.bits, "per_channel": self.per_channel}
        arguments |= {"ternary_scale": self.ternary_scale, "binary_scale": self.binary_scale}
        remove_quantization_(module, [n for n in current if n not in stored])
        convert_sites_(module, [n for n in stored if n not in current], arguments)
        mine = [r for r in getattr(module, RECIPES_ATTR, None) or [] if r.get("kind") == RECIPE_KIND]
        if len(mine) == 1:
            mine[0]["sites"] = list(stored)  # on_load_checkpoint then puts the stored recipe in its place
        rank_zero_warn(
            f"BlendedQuantWeights: following the checkpoint, the quantized layers are {stored} (this callback's "
            f"arguments selected {current})"
        )


class _BlendTarget:
    """q of the weight the model uses: q(W ⊙ M) while ModelPruning holds a mask M on the latent W."""

    def __init__(self, chain: nn.Module, quantizer: Any) -> None:
        self.chain, self.quantizer = chain, quantizer

    def __call__(self, w: Tensor) -> Tensor:
        mask = pruning_mask(self.chain)
        return self.quantizer.quantize(w if mask is None else w * mask)

    def fused_blend_(self, w: Tensor, rho: float | Tensor) -> bool:
        return pruning_mask(self.chain) is None and self.quantizer.fused_blend_(w, rho)

    def for_blend(self, w: Tensor) -> Tensor:
        return self.quantizer.for_blend(w) if pruning_mask(self.chain) is None else self(w)
