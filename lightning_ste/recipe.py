"""The one store of conversion state: recipes on the model, in checkpoints, and ``load_from_checkpoint``.

A recipe is ``{"kind", "version", "arguments", "sites"}``: ``arguments`` is ``config.to_dict()``, ``sites`` the
converted names. Every conversion appends its recipe to the root module (:func:`record`); the callbacks copy
the list into ``checkpoint["lightning_ste"]["recipes"]`` (:func:`write`); the load pre-hook, resume and
:func:`load_from_checkpoint` read it back with :func:`recipes_of`. Replaying the recipes on a freshly built
model (:func:`apply_recipes`) gives the same modules and ``state_dict`` keys.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "apply_recipes",
    "find",
    "load_from_checkpoint",
    "make",
    "record",
    "recipes_of",
    "recipes_on",
    "write",
]

RECIPE_KINDS = ("activations", "weights")
VERSION = 1
CHECKPOINT_KEY = "lightning_ste"
_ATTR = "_lightning_ste_recipes"  # a plain attribute of the root module, not a buffer


def make(kind: str, arguments: dict[str, Any], sites: Iterable[str]) -> dict[str, Any]:
    """A recipe: what was converted (``sites``) and how (``arguments``, a config's ``to_dict()``)."""
    if kind not in RECIPE_KINDS:
        raise ValueError(f"unknown recipe kind {kind!r}; allowed: {', '.join(RECIPE_KINDS)}")
    return {"kind": kind, "version": VERSION, "arguments": copy.deepcopy(arguments), "sites": list(sites)}


def check(recipe: object, kind: str) -> dict[str, Any]:
    """``recipe`` if it is a recipe of ``kind`` this version reads; ValueError otherwise."""
    if not isinstance(recipe, dict) or recipe.get("kind") != kind:
        got = recipe.get("kind") if isinstance(recipe, dict) else type(recipe).__name__
        raise ValueError(f"`recipe` must be a {kind!r} recipe, got kind {got!r}")
    if recipe.get("version") != VERSION:
        raise ValueError(f"unsupported {kind} recipe version {recipe.get('version')!r} (this is {VERSION})")
    if not recipe.get("sites"):
        raise ValueError(f"{kind} recipe has no `sites`")
    return recipe


def recipes_on(module: nn.Module, kind: str | None = None) -> list[dict[str, Any]]:
    """The recipes recorded on ``module`` (of ``kind`` when given), oldest first; a copy of the list."""
    return [r for r in module.__dict__.get(_ATTR) or [] if kind is None or r.get("kind") == kind]


def find(module: nn.Module, kind: str, arguments: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The last recipe of ``kind`` on ``module`` (made with exactly ``arguments`` when given), or None."""
    found = [r for r in recipes_on(module, kind) if arguments is None or r.get("arguments") == arguments]
    return found[-1] if found else None


def record(module: nn.Module, recipe: dict[str, Any]) -> Callable[[], None]:
    """Append ``recipe`` to ``module``'s recipes; return the function that takes it back out."""
    recipes = module.__dict__.setdefault(_ATTR, [])
    recipes.append(recipe)

    def drop() -> None:
        remaining = [r for r in module.__dict__.get(_ATTR) or [] if r is not recipe]
        if remaining:
            module.__dict__[_ATTR][:] = remaining
        else:
            module.__dict__.pop(_ATTR, None)

    return drop


def replace(module: nn.Module, kind: str, recipes: list[dict[str, Any]]) -> None:
    """Make ``recipes`` the ``kind`` recipes of ``module``, where the first one of that kind stood."""
    current = module.__dict__.get(_ATTR) or []
    at = next((i for i, r in enumerate(current) if r.get("kind") == kind), len(current))
    kept = [r for r in current if r.get("kind") != kind]
    merged = kept[:at] + copy.deepcopy(recipes) + kept[at:]
    if merged:
        module.__dict__[_ATTR] = merged
    else:
        module.__dict__.pop(_ATTR, None)


def write(module: nn.Module, checkpoint: dict[str, Any]) -> None:
    """Store ``module``'s recipes in a checkpoint dict (both callbacks call it; the content is the same)."""
    recipes = recipes_on(module)
    if recipes:
        checkpoint[CHECKPOINT_KEY] = {"recipes": copy.deepcopy(recipes)}


def apply_recipes(module: nn.Module, recipes: Iterable[dict[str, Any]]) -> nn.Module:
    """Re-apply conversion recipes to ``module`` in order; a recipe the module already holds is skipped."""
    for recipe in recipes:
        if not isinstance(recipe, dict) or recipe.get("kind") not in RECIPE_KINDS:
            kind = recipe.get("kind") if isinstance(recipe, dict) else type(recipe).__name__
            raise ValueError(f"unknown recipe kind {kind!r}; allowed: {', '.join(RECIPE_KINDS)}")
        if recipe in recipes_on(module):
            continue
        if recipe["kind"] == "activations":
            from lightning_ste.surgery.activation_plan import apply_recipe
        else:
            # Imported here: the activation path does not need the weight quantizer module.
            from lightning_ste.surgery.weight_params import apply_recipe
        apply_recipe(module, recipe)
    return module


def recipes_of(checkpoint: dict[str, Any], kind: str | None = None) -> list[dict[str, Any]]:
    """The recipes stored in a loaded checkpoint dict (of ``kind`` when given; empty when it holds none)."""
    stored = (checkpoint.get(CHECKPOINT_KEY) or {}).get("recipes") or []
    return [r for r in stored if kind is None or (isinstance(r, dict) and r.get("kind") == kind)]


def _init_kwargs(cls: type, hparams: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments as Lightning builds them: saved hyperparameters, overridden by ``kwargs``."""
    merged = {**hparams, **kwargs}
    parameters = inspect.signature(cls).parameters
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
        from lightning_ste.surgery.lazy import lazy_modules, materialize_lazy_

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
    hook = getattr(model, "on_load_checkpoint", None)
    if callable(hook):
        hook(checkpoint)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model.eval()
