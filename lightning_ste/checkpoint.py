"""The conversion recipes stored in checkpoints, and a Trainer-free ``load_from_checkpoint``.

Every conversion (``quantize_activations_``, ``quantize_weights_``) appends a recipe to the root module's
``_lightning_ste_recipes`` list; the callbacks write that list to ``checkpoint["lightning_ste"]["recipes"]``.
Replaying the recipes on a freshly built model gives the same modules and ``state_dict`` keys.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["apply_recipes", "load_from_checkpoint", "recipes_of"]

RECIPE_KINDS = ("activations", "weights")


def apply_recipes(module: nn.Module, recipes: Iterable[dict[str, Any]]) -> nn.Module:
    """Re-apply conversion recipes to ``module`` in order; a recipe the module already holds is skipped."""
    for recipe in recipes:
        if not isinstance(recipe, dict) or recipe.get("kind") not in RECIPE_KINDS:
            kind = recipe.get("kind") if isinstance(recipe, dict) else type(recipe).__name__
            raise ValueError(f"unknown recipe kind {kind!r}; allowed: {', '.join(RECIPE_KINDS)}")
        if recipe in (module.__dict__.get("_lightning_ste_recipes") or []):
            continue
        if recipe["kind"] == "activations":
            from lightning_ste.convert import apply_recipe
        else:
            # Imported here: the activation path does not need the weight quantizer module.
            from lightning_ste.weights import apply_recipe
        apply_recipe(module, recipe)
    return module


def recipes_of(checkpoint: dict[str, Any]) -> list[dict[str, Any]]:
    """The recipes stored in a loaded checkpoint dict (empty when it holds none)."""
    return list((checkpoint.get("lightning_ste") or {}).get("recipes") or [])


def _init_kwargs(cls: type, hparams: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as Lightning builds them: saved hyperparameters, overridden by ``kwargs``."""
    merged = {**hparams, **kwargs}
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return merged
    return {k: v for k, v in merged.items() if k in parameters}


def load_from_checkpoint(
    cls: type[nn.Module], path: str | Path, map_location: Any = "cpu", **kwargs: Any
) -> nn.Module:
    """Rebuild a quantized model from a Lightning checkpoint, no Trainer needed; returned in eval mode.

    Builds ``cls(**{**checkpoint["hyper_parameters"], **kwargs})``, calls its ``configure_model`` (if any),
    initialises lazy modules with a probe forward on ``example_input_array`` when their weights were
    quantized, replays the stored conversion recipes (both callbacks'), loads the ``state_dict`` strictly. The checkpoint is unpickled in full
    (``weights_only=False``), as Lightning does: load only checkpoints you trust.
    """
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict')")
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    model = cls(**_init_kwargs(cls, hparams, kwargs))
    configure_model = getattr(model, "configure_model", None)
    if callable(configure_model):
        configure_model()  # layers built there exist before the recipes are replayed, as in the Trainer
    recipes = recipes_of(checkpoint)
    if any(r.get("kind") == "weights" for r in recipes if isinstance(r, dict)):
        from lightning_ste.weights import lazy_modules, materialize_lazy_

        if lazy_modules(model):
            # Lazy layers get their shapes from one probe forward (their values then come from the checkpoint).
            example = getattr(model, "example_input_array", None)
            if example is None:
                raise ValueError(
                    f"{type(model).__name__} has lazy modules ({', '.join(lazy_modules(model))}) whose weights "
                    "were quantized: set `example_input_array` on it so one probe forward gives them their shapes"
                )
            materialize_lazy_(model, example)
    apply_recipes(model, recipes)
    if hasattr(model, "on_load_checkpoint"):
        model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()
