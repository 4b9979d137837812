"""Quantize the weights of Linear / Conv layers with ``torch.nn.utils.parametrize``: W -> q(W) (BCGD19).

Each selected layer's ``weight`` becomes the parametrization ``q(W)`` of
:class:`~lightning_ste.WeightQuantizer`: ``layer.parametrizations.weight.original`` is the float latent W
the optimizer trains, and ``layer.weight`` returns q(W), with the gradient passed to W straight through
(docs/math.md). Biases and normalisation parameters are left alone. No Lightning here: the callback
:class:`~lightning_ste.callbacks.blended_quant_weights.BlendedQuantWeights` calls :func:`plan_weights` and
:meth:`WeightPlan.apply`; a plain ``nn.Module`` uses :func:`quantize_weights_`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, ClassVar

from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from lightning_ste import recipe as recipe_store
from lightning_ste._compat import parameter_slots
from lightning_ste.config import WeightQuantConfig, check_bool
from lightning_ste.inspect import quantized_layers, weight_quantizer
from lightning_ste.quantizers.transposed import TransposedWeightQuantizer
from lightning_ste.quantizers.weight import WeightQuantizer
from lightning_ste.surgery.lazy import execution_order, lazy_modules, materialize_lazy_
from lightning_ste.surgery.plan import ConversionPlan, Undo, select_names
from lightning_ste.surgery.weight_leftovers import float_leftovers, weight_users

__all__ = [
    "RECIPE_KIND",
    "WeightPlan",
    "apply_recipe",
    "follow_sites_",
    "has_weights_recipe",
    "plan_weights",
    "quantize_weights_",
    "remove_quantization_",
    "set_quantizer_arguments_",
]

RECIPE_KIND = "weights"
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class WeightPlan(ConversionPlan):
    """What a weight conversion will do: the layers to quantize and why the others stay float."""

    kind: ClassVar[str] = RECIPE_KIND

    def __init__(
        self,
        config: WeightQuantConfig,
        sites: list[str],
        left_out: list[tuple[str, str]] | None = None,
        kept_first_last: list[str] | None = None,
        shapes: dict[str, tuple[str, tuple[int, ...]]] | None = None,
        shared: dict[str, list[str]] | None = None,  # site -> the others holding its weight
        floats: list[tuple[str, str]] | None = None,  # other float weights and why
        norms: int = 0,  # normalisation layers (float by design)
        biases: int = 0,
        materialized: list[str] | None = None,  # lazy modules the probe initialised
        stored: dict[str, Any] | None = None,  # a replayed recipe, recorded as it was given
    ) -> None:
        super().__init__()
        self.config, self.sites, self.left_out = config, sites, left_out or []
        self.kept_first_last, self.shapes, self.shared = kept_first_last or [], shapes or {}, shared or {}
        self.floats, self.norms, self.biases = floats or [], norms, biases
        self.materialized = materialized or []
        self.title = "quantize_weights_"
        self._recipe = stored

    @property
    def names(self) -> list[str]:
        return list(self.sites)

    def recipe(self) -> dict[str, Any]:
        # Made once: the recorded dict is this object, so a checkpoint's sites (follow_) update it in place.
        if self._recipe is None:
            self._recipe = super().recipe()
        return self._recipe

    def lines(self, dry_run: bool = False) -> list[str]:
        """Each quantized layer, then each float layer with the reason."""
        c = self.config
        kind = {1: "binary", 2: "ternary"}.get(c.bits, f"{c.bits}-bit")
        scale = {1: f"{c.binary_scale}|W|", 2: f"{c.ternary_scale} scale"}.get(c.bits, "least squares")
        gran = "per output channel" if c.per_channel else "per tensor"
        lines = [f"{self.title} plan: {len(self.sites)} layer(s) get {kind} weights ({scale}, {gran})"]
        if self.materialized:
            lines.append(f"  lazy modules initialised by a probe forward: {', '.join(self.materialized)}")
        for name in self.sites:
            cls, shape = self.shapes.get(name, ("?", ()))
            tied = ""
            if self.shared.get(name):
                tied = f"; weight shared with {', '.join(self.shared[name])}: one latent, one quantizer, one blend"
            lines.append(f"  quantize  {name} ({cls}, weight {'x'.join(map(str, shape))}){tied}")
        for name, reason in self.left_out:
            cls, _ = self.shapes.get(name, ("?", ()))
            lines.append(f"  float     {name} ({cls}): {reason}")
        if self.kept_first_last:
            lines.append(f"  keep_first_last kept in float: {', '.join(self.kept_first_last)}")
        rest = [f"  {name}: {why}" for name, why in self.floats]
        if self.norms:
            rest.append(f"  {self.norms} normalisation layer(s): float by design")
        if self.biases:
            rest.append(f"  {self.biases} bias(es): float by design")
        lines.append(f"Stays float ({len(rest)}):" if rest else "Stays float: nothing else.")
        return lines + rest

    def _apply(self, module: nn.Module, undo: Undo) -> None:
        _parametrize_sites(module, self.sites, self.config, undo)

    def record_change(self, undo: Callable[[], None]) -> None:
        """A change made after :meth:`apply` (a checkpoint's layers or recipe); :meth:`revert` undoes it first."""
        if not self.applied:
            raise RuntimeError(f"this {type(self).__name__} is not applied")
        self._undo.append(undo)

    def follow_(self, module: nn.Module, sites: Sequence[str]) -> None:
        """Quantize exactly ``sites`` (a checkpoint's) instead of this applied plan's; :meth:`revert` undoes it."""
        follow_sites_(module, sites, self.config, self.record_change)
        before = self.sites
        self.sites = list(sites)
        self.record_change(lambda: setattr(self, "sites", before))


def has_weights_recipe(module: nn.Module) -> bool:
    """Whether ``module`` already holds a weights recipe (so a second fit does not convert again)."""
    return recipe_store.find(module, RECIPE_KIND) is not None


def _candidates(module: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """Layers of ``layer_types`` with a plain (not yet parametrized) float weight parameter, in definition order."""
    found = []
    for name, layer in module.named_modules():
        if not name or not isinstance(layer, layer_types) or parametrize.is_parametrized(layer, "weight"):
            continue
        weight = parameter_slots(layer).get("weight")
        if isinstance(weight, nn.Parameter) and weight.is_floating_point():
            found.append((name, layer))
    return found


def plan_weights(
    module: nn.Module, config: WeightQuantConfig | None = None, *, example_input: Any = None, **kwargs: Any
) -> WeightPlan:
    """Decide which layers :func:`quantize_weights_` converts; changes nothing. ValueError when none is selected.

    Takes a :class:`~lightning_ste.config.WeightQuantConfig` or its arguments as keywords.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be an nn.Module, got {type(module).__name__}")
    config = WeightQuantConfig.of(config, **kwargs)
    inc, exc, types = config.include, config.exclude, tuple(config.layer_types)
    materialized = materialize_lazy_(module, example_input)
    candidates = _candidates(module, types)
    if not candidates:
        raise ValueError(
            f"no layer with a float `weight` of `layer_types` {[t.__name__ for t in types]} in "
            f"{type(module).__name__} (already quantized layers are skipped; the callbacks convert after the "
            "LightningModule's `setup` and `configure_model`, so layers built there count)"
        )
    names = [n for n, _ in candidates]
    shapes = {n: (type(m).__name__, tuple(parameter_slots(m)["weight"].shape)) for n, m in candidates}  # type: ignore[union-attr]
    selected, excluded, unmatched = select_names(names, inc, exc)
    if unmatched:
        raise ValueError(
            f"`include` pattern(s) {unmatched} match no layer of `layer_types`; candidates: {', '.join(names)}"
        )
    included = set(select_names(names, inc, None)[0])
    left_out = [
        (n, "excluded by `exclude`" if n in included else "not matched by `include`") for n in excluded
    ]
    kept: list[str] = []
    if config.keep_first_last:
        if example_input is None:
            raise ValueError("`keep_first_last=True` needs `example_input` to find the execution order")
        order = execution_order(module, names, example_input)
        if not order:
            raise ValueError(
                "`keep_first_last=True`: the probe forward called none of the candidate layers "
                f"({', '.join(names)})"
            )
        kept = [order[0]] if len(order) == 1 else [order[0], order[-1]]
        for n in kept:
            where = "first" if n == order[0] else "last"
            if n in selected:
                selected.remove(n)
                left_out.append((n, f"kept by `keep_first_last` ({where} in execution order)"))
    if not selected:
        if len(excluded) < len(names):
            culprit = "keep_first_last"
        elif inc is None or (exc is not None and included):
            culprit = "exclude"
        else:
            culprit = "include"
        arguments = config.to_dict()
        raise ValueError(
            f"nothing selected: `{culprit}` leaves no layer to quantize (include={arguments['include']}, "
            f"exclude={arguments['exclude']}, keep_first_last={config.keep_first_last}); "
            f"candidates: {', '.join(names)}"
        )
    users = weight_users(module)
    site_weight = {n: id(parameter_slots(module.get_submodule(n))["weight"]) for n in names}
    shared = {n: [u for u in users[w] if u != f"{n}.weight"] for n, w in site_weight.items() if w in users}
    quantized = {site_weight[n] for n in selected}
    floats, norms, biases = float_leftovers(module, {id(m) for _, m in candidates}, types, quantized)
    return WeightPlan(config, selected, left_out, kept, shapes, shared, floats, norms, biases, materialized)


def quantize_weights_(
    module: nn.Module,
    config: WeightQuantConfig | None = None,
    *,
    example_input: Any = None,
    dry_run: bool = False,
    **kwargs: Any,
) -> list[str]:
    """Make each selected layer's weight q(W) (binary mean|W| sign(W), ternary TWN, b-bit) via ``parametrize`` (BCGD19); return the layer names.

    Takes a :class:`~lightning_ste.config.WeightQuantConfig` or its arguments as keywords: ``include``/
    ``exclude`` glob patterns over module names, ``layer_types`` the layer classes considered,
    ``keep_first_last=True`` keeps the first and last of them *in execution order* (a probe forward on
    ``example_input``) in float. ``dry_run=True`` prints the plan and changes nothing. The module is left
    unchanged on any error. The recipe is recorded on ``module`` (:mod:`lightning_ste.recipe`). Lazy modules
    (``nn.LazyLinear``, ...) are initialised first by a probe forward on ``example_input`` (on a copy when
    ``dry_run``). Layers sharing one weight Parameter share its latent and quantizer.
    """
    check_bool("dry_run", dry_run)
    target = copy.deepcopy(module) if dry_run and lazy_modules(module) else module
    plan = plan_weights(target, config, example_input=example_input, **kwargs)
    if dry_run:
        print(plan.format(dry_run=True))
        return plan.names
    return plan.apply(module)


# -------------------------------------------------------------------------------------- parametrize


def _quantizer_config(arguments: dict[str, Any]) -> WeightQuantConfig:
    """The config of a recipe's quantizer settings; the layer classes it names are not imported again (a
    replay converts the recorded sites, and a class defined inside a function cannot be imported)."""
    keys = WeightQuantConfig().quantizer_arguments
    return WeightQuantConfig(**{k: arguments[k] for k in keys if k in arguments})


def _make_quantizer(config: WeightQuantConfig, layer: nn.Module) -> WeightQuantizer:
    if isinstance(layer, _TRANSPOSED):
        return TransposedWeightQuantizer(groups=layer.groups, **config.quantizer_arguments)
    return WeightQuantizer(**config.quantizer_arguments)


def _site_layer(module: nn.Module, name: str) -> nn.Module:
    """The layer ``name`` if its weight can be quantized; ValueError naming what is wrong otherwise."""
    try:
        layer = module.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"recipe site {name!r} is not a submodule of {type(module).__name__}") from err
    if parametrize.is_parametrized(layer, "weight"):
        raise ValueError(f"the weight of {name!r} is already parametrized; it cannot be quantized again")
    weight = parameter_slots(layer).get("weight")
    if not isinstance(weight, nn.Parameter):
        raise ValueError(f"{name!r} ({type(layer).__name__}) has no `weight` parameter to quantize")
    if is_lazy(weight):
        raise ValueError(
            f"{name!r} ({type(layer).__name__}) is lazy and not initialized yet: run one forward first "
            "(see `materialize_lazy_`)"
        )
    return layer


def _parametrize_sites(
    module: nn.Module, sites: Sequence[str], config: WeightQuantConfig, undo: Undo
) -> None:
    """Make ``weight`` of each site q(W), each registration followed by ``undo(fn)`` with its exact undo."""
    layers = [_site_layer(module, name) for name in sites]  # all checked before the module is touched
    # A Parameter shared by several layers (tied weights) gets one quantizer: one latent, one q, one blend.
    quantizers: dict[int, WeightQuantizer] = {}
    for layer in layers:
        weight = parameter_slots(layer)["weight"]
        if id(weight) not in quantizers:
            quantizers[id(weight)] = _make_quantizer(config, layer)
        quantizer = quantizers[id(weight)]
        order = list(parameter_slots(layer))
        parametrize.register_parametrization(layer, "weight", quantizer)
        undo(partial(_unparametrize, layer, order))


def _unparametrize(layer: nn.Module, order: Sequence[str] = ("weight",)) -> None:
    """``weight`` is the float latent W again, with the parameters in ``order`` (``weight`` first by default,
    where torch layers register it: the optimizer's state indexing is that of a layer never quantized)."""
    parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
    params = parameter_slots(layer)
    ordered = {k: params[k] for k in order if k in params}
    ordered.update({k: v for k, v in params.items() if k not in ordered})
    params.clear()
    params.update(ordered)


def _reparametrize(layer: nn.Module, quantizer: WeightQuantizer) -> None:
    parametrize.register_parametrization(layer, "weight", quantizer)


def remove_quantization_(module: nn.Module, sites: Sequence[str] | None = None) -> list[str]:
    """Undo the weight quantization of ``sites`` (all when None): ``weight`` is the float latent W again."""
    removed = []
    for name, layer, _, _ in list(quantized_layers(module)):
        if sites is None or name in sites:
            _unparametrize(layer)
            removed.append(name)
    return removed


def follow_sites_(
    module: nn.Module, sites: Sequence[str], config: WeightQuantConfig, undo: Undo | None = None
) -> None:
    """Make the quantized layers exactly ``sites`` (a checkpoint's): new ones get ``config``'s q, the others
    float W back; a single weights recipe on ``module`` then names ``sites``. ``undo(fn)`` after each change."""
    current = [name for name, *_ in quantized_layers(module)]
    for name in current:
        if name not in sites:
            layer = module.get_submodule(name)
            quantizer = weight_quantizer(layer)
            _unparametrize(layer)
            if undo is not None and quantizer is not None:
                undo(partial(_reparametrize, layer, quantizer))
    _parametrize_sites(module, [n for n in sites if n not in current], config, undo or (lambda _: None))
    mine = recipe_store.recipes_on(module, RECIPE_KIND)
    if len(mine) == 1:
        recorded, before = mine[0], mine[0]["sites"]
        recorded["sites"] = list(sites)  # the load then puts the stored recipe in its place
        if undo is not None:
            undo(lambda: recorded.__setitem__("sites", before))


def set_quantizer_arguments_(
    module: nn.Module, arguments: dict[str, Any], sites: Sequence[str] | None = None
) -> None:
    """Give the quantizers of ``sites`` (all when None) the settings of ``arguments`` (q has no state to lose)."""
    settings = _quantizer_config(arguments).quantizer_arguments
    for name, _, _, quantizer in quantized_layers(module):
        if sites is None or name in sites:
            for k, v in settings.items():
                setattr(quantizer, k, v)


def apply_recipe(module: nn.Module, recipe: dict[str, Any]) -> list[str]:
    """Re-apply a stored weights recipe to a fresh module: exactly the recorded sites, the recorded arguments."""
    recipe = recipe_store.check(recipe, RECIPE_KIND)
    arguments = dict(recipe.get("arguments") or {})
    sites = list(recipe["sites"])
    plan = WeightPlan(
        _quantizer_config(arguments), sites, stored={**recipe, "arguments": arguments, "sites": sites}
    )
    return plan.apply(module)
