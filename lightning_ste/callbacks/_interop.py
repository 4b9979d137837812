"""Lightning interop of the callbacks: the configure_model hook, the probe input, SWA and ModelPruning.

The conversion runs right after ``configure_model`` (:func:`after_configure_model`); a probe forward takes
``example_input_array`` or the first batch (:func:`example_input`). StochasticWeightAveraging and
ModelPruning are kept consistent with a model our callbacks rewrote.

Both callbacks take references to the model in their own ``setup``: SWA deep-copies it, ModelPruning lists
``(module, "weight")`` pairs. A conversion in a later ``setup`` hook invalidates both (SWA then averages
mismatched tensors; pruning a parametrized ``weight`` fails with a TypeError, and auto-discovery skips it).
The functions here repair those references. ModelPruning's public ``filter_parameters_to_prune`` runs only
inside its own ``setup``, before a later conversion, so its entries are read and written through
:mod:`lightning_ste._compat` (tests/test_compat.py and tests/test_reliability.py pin the behaviour).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning, StochasticWeightAveraging
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_ste._compat import (
    apply_batch_transfer,
    buffer_slots,
    parameter_slots,
    pruning_entries,
    pruning_original_layers,
    pruning_parameter_names,
    set_pruning_entries,
    stage_data_loader,
)
from lightning_ste.inspect import weight_chain

__all__ = [
    "LATENT_NAME",
    "after_configure_model",
    "cancel_after_configure_model",
    "example_input",
    "auto_pruners_after",
    "latent_parameter",
    "pruning_mask",
    "quantized_chain",
    "recopy_earlier_swa",
    "restore_pruning",
    "retarget_pruning",
]

LATENT_NAME = "original"  # the float W of a parametrized weight: layer.parametrizations.weight.original
_PENDING = "_lightning_ste_after_configure_model"
_STAGE_LOOPS = {
    "fit": "fit_loop",
    "validate": "validate_loop",
    "test": "test_loop",
    "predict": "predict_loop",
}


def after_configure_model(pl_module: pl.LightningModule, fn: Callable[[], None]) -> bool:
    """Run ``fn`` right after the module's ``configure_model`` (or its ``setup``), or now when it overrides neither.

    Lightning calls every callback's ``setup``, then ``LightningModule.setup``, then
    ``LightningModule.configure_model`` (its lazy-init hook, where FSDP users build layers), and only then
    restores ``ckpt_path``, wraps the model for the strategy and builds the optimizers. A conversion deferred
    here therefore sees every layer and still comes before all of those. The hook is wrapped on the instance
    for that one call (the wrapper keeps ``__wrapped__``, so Lightning still sees it as overridden) and removed
    again after it. Returns whether ``fn`` was deferred.
    """
    hook = next((h for h in ("configure_model", "setup") if is_overridden(h, pl_module)), None)
    if hook is None:
        fn()
        return False
    pending: list[Callable[[], None]] | None = pl_module.__dict__.get(_PENDING)
    if pending is None:
        pending = []
        original = getattr(pl_module, hook)

        def wrapper(*args: Any, **kwargs: Any) -> None:
            try:
                original(*args, **kwargs)
            finally:
                cancel_after_configure_model(pl_module)
            for step in pending:
                step()

        wrapper.__wrapped__ = original  # type: ignore[attr-defined]
        wrapper.lightning_ste_wrapper = True  # type: ignore[attr-defined]
        pl_module.__dict__[hook] = wrapper
        pl_module.__dict__[_PENDING] = pending
    pending.append(fn)
    return True


def cancel_after_configure_model(pl_module: nn.Module) -> None:
    """Drop a pending :func:`after_configure_model` wrapper (the run failed before the hook ran)."""
    for hook in ("configure_model", "setup"):
        if getattr(pl_module.__dict__.get(hook), "lightning_ste_wrapper", False):
            del pl_module.__dict__[hook]
    pl_module.__dict__.pop(_PENDING, None)


def _earlier(trainer: pl.Trainer, me: Callback) -> Iterator[Callback]:
    """Callbacks whose ``setup`` ran before ``me``'s (Lightning calls them in ``trainer.callbacks`` order)."""
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if cb is me:
            return
        yield cb


def recopy_earlier_swa(trainer: pl.Trainer, pl_module: pl.LightningModule, me: Callback, stage: str) -> None:
    """Re-run ``setup`` of a StochasticWeightAveraging listed before ``me``: its copy predates the conversion."""
    if stage != "fit":
        return
    for cb in _earlier(trainer, me):
        if isinstance(cb, StochasticWeightAveraging):
            cb.setup(trainer, pl_module, stage)


def latent_parameter(chain: nn.Module) -> nn.Parameter:
    """The float latent W of a parametrization chain, also while torch.nn.utils.prune holds it as ``original_orig``."""
    params = parameter_slots(chain)
    param = params.get(LATENT_NAME)
    if param is None:
        param = params[LATENT_NAME + "_orig"]
    assert param is not None, "a parametrization chain always holds its latent"
    return param


def quantized_chain(layer: nn.Module) -> nn.Module:
    """``layer.parametrizations.weight`` of a layer whose weight is quantized."""
    chain = weight_chain(layer)
    assert chain is not None, f"{type(layer).__name__}.weight is not parametrized"
    return chain


def pruning_mask(chain: nn.Module) -> torch.Tensor | None:
    """The pruning mask of the latent W, or None when it is not pruned."""
    return buffer_slots(chain).get(LATENT_NAME + "_mask")


def _pruners(trainer: pl.Trainer) -> list[ModelPruning]:
    return [cb for cb in trainer.callbacks if isinstance(cb, ModelPruning)]  # type: ignore[attr-defined]


def auto_pruners_after(trainer: pl.Trainer, me: Callback) -> list[ModelPruning]:
    """ModelPruning callbacks set up after ``me`` that will discover their parameters themselves."""
    before = {id(cb) for cb in _earlier(trainer, me)}
    return [cb for cb in _pruners(trainer) if id(cb) not in before and not pruning_entries(cb)]


def retarget_pruning(
    trainer: pl.Trainer, layers: dict[int, nn.Module], auto: set[int]
) -> dict[int, list[tuple[int, nn.Module]]]:
    """Make every ModelPruning prune the latent W of the quantized ``layers`` (``id(layer) -> layer``).

    ``(layer, "weight")`` becomes ``(layer.parametrizations.weight, "original")``, so the model uses q(W ⊙ M)
    and pruned weights stay exactly 0 for every quantizer (sign(0) = 0, code 0). A pruner in ``auto`` (it
    discovered its parameters after the conversion, which hid the quantized weights) gets them appended.
    Returns, per pruner, what :func:`restore_pruning` needs to undo this before its next ``setup``.
    """
    undo: dict[int, list[tuple[int, nn.Module]]] = {}
    for cb in _pruners(trainer):
        entries = pruning_entries(cb)
        changed: list[tuple[int, nn.Module]] = []
        for i, (module, name) in enumerate(entries):
            if name == "weight" and id(module) in layers:
                entries[i] = (quantized_chain(module), LATENT_NAME)
                changed.append((i, module))
        if id(cb) in auto and "weight" in pruning_parameter_names(cb):
            held = {id(m) for m, _ in entries}
            for layer in layers.values():
                chain = quantized_chain(layer)
                if id(chain) not in held:
                    entries.append((chain, LATENT_NAME))
                    changed.append((len(entries) - 1, layer))
        if not changed:
            continue
        set_pruning_entries(cb, entries)
        refs = pruning_original_layers(cb)
        if refs is not None:
            _retarget_lottery_ticket(refs, changed)
        undo[id(cb)] = changed
    return undo


def _retarget_lottery_ticket(refs: dict[int, Any], changed: list[tuple[int, nn.Module]]) -> None:
    """Point the lottery-ticket copies (``refs``) of the retargeted entries at the latent W's initial value."""
    for i, layer in changed:
        ref = refs.get(id(layer))
        if ref is not None:
            ref["names"] = [(j, n) for j, n in ref["names"] if j != i]
            copy = ref["data"]
            initial = (
                copy.parametrizations.weight.original
                if parametrize.is_parametrized(copy, "weight")
                else copy.weight
            )
        else:  # appended: the pruner never saw it, its value now is the start of this fit
            initial = latent_parameter(quantized_chain(layer))
        holder = nn.Module()
        holder.register_parameter(LATENT_NAME, nn.Parameter(initial.detach().clone(), requires_grad=False))
        refs[id(quantized_chain(layer))] = {"data": holder, "names": [(i, LATENT_NAME)]}


def restore_pruning(trainer: pl.Trainer, undo: dict[int, list[tuple[int, nn.Module]]]) -> None:
    """Give each pruner ``(layer, "weight")`` entries again, which its own ``setup`` accepts in a later fit."""
    for cb in _pruners(trainer):
        changed = undo.get(id(cb))
        if not changed:
            continue
        entries = pruning_entries(cb)
        for i, layer in changed:
            if i < len(entries) and entries[i][1] == LATENT_NAME:
                entries[i] = (layer, "weight")
        set_pruning_entries(cb, entries)


def example_input(trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> Any:
    """Model input for the keep_first_last probe: ``example_input_array``, else the first batch's input."""
    if pl_module.example_input_array is not None:
        return pl_module.example_input_array
    loader = stage_data_loader(trainer, _STAGE_LOOPS.get(str(stage), "fit_loop"))
    datamodule = getattr(trainer, "datamodule", None)  # set by the Trainer at fit, not declared on it
    if loader is None and datamodule is not None and stage == "fit":
        loader = datamodule.train_dataloader()
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
    batch = apply_batch_transfer(pl_module, next(iter(loader)))
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise ValueError(
        "`keep_first_last=True`: cannot tell the model input in a batch of type "
        f"{type(batch).__name__}; set `example_input_array` on the LightningModule"
    )
