"""Quantize the weights of Linear / Conv layers with ``torch.nn.utils.parametrize``: W -> q(W) (BCGD19).

Each selected layer's ``weight`` becomes the parametrization ``q(W)`` of
:class:`~lightning_ste.modules.WeightQuantizer`: ``layer.parametrizations.weight.original`` is the float
latent W the optimizer trains, and ``layer.weight`` returns q(W), with the gradient passed to W straight
through. Biases and normalisation parameters are left alone. No Lightning here: the callback
:class:`~lightning_ste.callbacks.weights.BlendedQuantWeights` calls :func:`plan_weights` and
:func:`apply_plan`, and a plain ``nn.Module`` can use :func:`quantize_weights_`.
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from lightning_ste import functional as F_ste
from lightning_ste.modules import WeightQuantizer
from lightning_ste.selection import check_patterns, select_names

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "RECIPE_KIND",
    "TransposedWeightQuantizer",
    "WeightPlan",
    "apply_plan",
    "apply_recipe",
    "check_layer_types",
    "execution_order",
    "lazy_modules",
    "materialize_lazy_",
    "layer_types_from_arguments",
    "set_quantizer_arguments_",
    "check_weight_args",
    "convert_sites_",
    "has_weights_recipe",
    "plan_weights",
    "quantize_weights_",
    "quantized_layers",
    "remove_quantization_",
]

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
RECIPE_KIND = "weights"
RECIPE_VERSION = 1
RECIPES_ATTR = "_lightning_ste_recipes"
QUANTIZER_ARGS = ("bits", "per_channel", "ternary_scale", "binary_scale")


class TransposedWeightQuantizer(WeightQuantizer):
    """q(W) of a ConvTranspose weight, laid out ``[in, out/groups, *k]``: ``per_channel`` scales per *output*
    channel, as for every other layer (q is computed on the weight viewed ``[out, in/groups, *k]``)."""

    def __init__(self, groups: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups = groups

    def out_major(self, w: Tensor) -> Tensor:
        """``[in, out/g, *k]`` -> contiguous ``[out, in/g, *k]`` (output channel ``o = g * out/g + j``)."""
        g, (i, o), k = self.groups, w.shape[:2], w.shape[2:]
        return w.reshape(g, i // g, o, *k).transpose(1, 2).reshape(g * o, i // g, *k).contiguous()

    def in_major(self, v: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`out_major` back to ``shape``."""
        g, (i, o), k = self.groups, shape[:2], shape[2:]
        return v.reshape(g, o, i // g, *k).transpose(1, 2).reshape(shape)

    def forward(self, w: Tensor) -> Tensor:
        if not self.per_channel or w.dim() < 2:
            return super().forward(w)
        return self.in_major(super().forward(self.out_major(w)), w.shape)

    @torch.no_grad()
    def quantize(self, w: Tensor) -> Tensor:
        if not self.per_channel or w.dim() < 2:
            return super().quantize(w)
        return self.in_major(super().quantize(self.out_major(w)), w.shape)

    @torch.no_grad()
    def weight_codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, scale) with ``codes * scale == q(W)`` in W's own layout (for packed export); the per-channel
        scale has shape ``[in, out/groups, 1, ...]`` so it broadcasts against the codes."""
        args = (self.bits, self.per_channel, self.ternary_scale, self.binary_scale)
        if not self.per_channel or w.dim() < 2:
            return F_ste.weight_codes(w, *args)
        codes, scale = F_ste.weight_codes(self.out_major(w), *args)
        g, (i, o) = self.groups, w.shape[:2]
        per_weight = scale.reshape(g, 1, o).expand(g, i // g, o).reshape(i, o, *([1] * (w.dim() - 2)))
        return self.in_major(codes, w.shape), per_weight

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups} (ConvTranspose layout)"


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


# ------------------------------------------------------------------------------------------ validation


def check_layer_types(layer_types: object) -> tuple[type[nn.Module], ...]:
    """Validate ``layer_types``: an ``nn.Module`` subclass or a non-empty sequence of them."""
    if isinstance(layer_types, type):
        layer_types = (layer_types,)
    if (
        isinstance(layer_types, (tuple, list))
        and layer_types
        and all(isinstance(t, type) and issubclass(t, nn.Module) for t in layer_types)
    ):
        return tuple(layer_types)
    raise ValueError(f"`layer_types` must be a non-empty tuple of nn.Module subclasses, got {layer_types!r}")


def _type_from_name(name: str) -> type[nn.Module]:
    module_name, _, qualname = name.rpartition(".")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _type_name(t: type) -> str:
    return f"{t.__module__}.{t.__qualname__}"


def check_weight_args(
    bits: object,
    per_channel: object,
    ternary_scale: object,
    binary_scale: object,
    keep_first_last: object,
    include: object,
    exclude: object,
    layer_types: object,
) -> tuple[tuple[str, ...] | None, tuple[str, ...] | None, tuple[type[nn.Module], ...]]:
    """Validate the conversion arguments (ValueError naming the argument); return the normalised patterns."""
    F_ste.check_bits(bits)
    if not isinstance(per_channel, bool):
        raise ValueError(f"`per_channel` must be a bool, got {per_channel!r}")
    F_ste.check_choice("ternary_scale", ternary_scale, F_ste.TERNARY_SCALES)
    F_ste.check_choice("binary_scale", binary_scale, F_ste.BINARY_SCALES)
    if not isinstance(keep_first_last, bool):
        raise ValueError(f"`keep_first_last` must be a bool, got {keep_first_last!r}")
    return (
        check_patterns(include, "include"),
        check_patterns(exclude, "exclude"),
        check_layer_types(layer_types),
    )


# ----------------------------------------------------------------------------------------- inspection


def _quantizer_of(layer: nn.Module) -> WeightQuantizer | None:
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    chain = layer.parametrizations.weight  # type: ignore[union-attr]
    # The blend W <- (1-ρ)W + ρ q(W) is only defined when q is the whole parametrization.
    if len(chain) == 1 and isinstance(chain[0], WeightQuantizer):
        return chain[0]
    return None


def quantized_layers(module: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Parameter, WeightQuantizer]]:
    """Yield ``(name, layer, latent W, quantizer)`` for every layer whose weight is q(W) of a WeightQuantizer."""
    for name, layer in module.named_modules():
        quantizer = _quantizer_of(layer)
        if quantizer is not None:
            yield name, layer, layer.parametrizations.weight.original, quantizer  # type: ignore[union-attr]


def has_weights_recipe(module: nn.Module) -> bool:
    """Whether ``module`` already holds a weights recipe (so a second fit does not convert again)."""
    return any(r.get("kind") == RECIPE_KIND for r in getattr(module, RECIPES_ATTR, []) or [])


def _candidates(module: nn.Module, layer_types: tuple[type[nn.Module], ...]) -> list[tuple[str, nn.Module]]:
    """Layers of ``layer_types`` with a plain (not yet parametrized) float weight parameter, in definition order."""
    found = []
    for name, layer in module.named_modules():
        if not name or not isinstance(layer, layer_types) or parametrize.is_parametrized(layer, "weight"):
            continue
        weight = layer._parameters.get("weight")
        if isinstance(weight, nn.Parameter) and weight.is_floating_point():
            found.append((name, layer))
    return found


def lazy_modules(module: nn.Module) -> list[str]:
    """Names of the modules holding an uninitialized (lazy) parameter or buffer."""
    return [
        name or "<root>"
        for name, m in module.named_modules()
        if any(is_lazy(t) for t in [*m._parameters.values(), *m._buffers.values()] if t is not None)
    ]


def _weight_users(module: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> [qualified names that hold it]`` for every parameter held in more than one place.

    A quantized layer's latent (``parametrizations.weight.original``) counts as its ``weight``.
    """
    users: dict[int, list[str]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, parametrize.ParametrizationList):
            continue
        for pname, p in m._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append(_join(name, pname))
        chains = getattr(m, "parametrizations", None)
        if isinstance(chains, nn.ModuleDict):
            for pname, chain in chains.items():
                latent = chain._parameters.get("original")
                if latent is not None:
                    users.setdefault(id(latent), []).append(_join(name, pname))
    return {k: sorted(set(v)) for k, v in users.items() if len(set(v)) > 1}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


_NORMS = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def _float_leftovers(
    module: nn.Module, candidates: set[int], types: tuple[type[nn.Module], ...], quantized: set[int]
) -> tuple[list[tuple[str, str]], int, int]:
    """Float weights no layer type selects, with why: ``([(name, reason)], n_norm_layers, n_biases)``."""
    leftovers: list[tuple[str, str]] = []
    norms = biases = 0
    seen: set[int] = set()
    for name, m in module.named_modules():
        if isinstance(m, parametrize.ParametrizationList) or id(m) in candidates:
            biases += sum(1 for k, p in m._parameters.items() if p is not None and "bias" in k)
            continue
        if isinstance(m, _NORMS):
            norms += any(p is not None for p in m._parameters.values())
            continue
        if isinstance(m, WeightQuantizer) or type(m).__name__ == "QuantReLU":
            continue
        for pname, p in m._parameters.items():
            if p is None or id(p) in seen or not p.is_floating_point():
                continue
            seen.add(id(p))
            if "bias" in pname:
                biases += 1
                continue
            cls = type(m).__name__
            if id(p) in quantized:
                why = "tied to the latent W of a quantized layer: this one reads the float W, not q(W)"
            elif isinstance(m, nn.MultiheadAttention):
                why = "a bare Parameter of MultiheadAttention, not a Linear module (its out_proj is a Linear)"
            elif pname == "weight" and not isinstance(m, types):
                why = f"{cls} is not in `layer_types`"
            elif pname == "weight":
                why = "already parametrized by something else"
            else:
                why = f"a bare Parameter of {cls}, not a layer weight"
            leftovers.append((f"{_join(name, pname)} ({cls})", why))
    return leftovers, norms, biases


# ---------------------------------------------------------------------------------------------- probe


def _first_float_param(module: nn.Module) -> Tensor | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def _to_model(obj: Any, ref: Tensor | None) -> Any:
    if isinstance(obj, Tensor):
        if ref is None:
            return obj
        return obj.to(device=ref.device, dtype=ref.dtype if obj.is_floating_point() else obj.dtype)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_model(o, ref) for o in obj)
    if isinstance(obj, dict):
        return {k: _to_model(v, ref) for k, v in obj.items()}
    return obj


@torch.no_grad()
def execution_order(module: nn.Module, names: Sequence[str], example_input: Any) -> list[str]:
    """Names among ``names`` in the order a forward on ``example_input`` first calls them (eval mode, no grad).

    ``example_input`` follows Lightning's ``example_input_array``: a tuple is passed as positional arguments,
    a dict as keyword arguments, anything else as the single argument. The probe runs in eval mode so it
    changes no BatchNorm statistic and calibrates no activation; the training flags are restored after.
    """
    order: list[str] = []
    seen: set[str] = set()

    def hook_for(name: str):
        def hook(_mod: nn.Module, _args: Any) -> None:
            if name not in seen:
                seen.add(name)
                order.append(name)

        return hook

    handles = [module.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        _probe(module, example_input, "`keep_first_last`")
    finally:
        for h in handles:
            h.remove()
    return order


@torch.no_grad()
def _probe(module: nn.Module, example_input: Any, purpose: str) -> None:
    """One forward on ``example_input`` in eval mode without grad; training flags restored after."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        x = _to_model(example_input, _first_float_param(module))
        module.eval()
        if isinstance(x, tuple):
            module(*x)
        elif isinstance(x, dict):
            module(**x)
        else:
            module(x)
    except Exception as err:
        raise ValueError(
            f"{purpose} needs a probe forward on `example_input`, and calling the model failed: {err!r}"
        ) from err
    finally:
        for m, mode in modes:
            m.training = mode


def materialize_lazy_(module: nn.Module, example_input: Any = None) -> list[str]:
    """Give lazy modules (``nn.LazyLinear``, ``LazyConv2d``, ...) their shapes with one probe forward.

    The probe runs in eval mode without grad (no BatchNorm statistic changes), as the first real forward
    would initialise them. Returns the names of the modules that were lazy; ValueError when some are and
    ``example_input`` is None.
    """
    lazy = lazy_modules(module)
    if not lazy:
        return []
    if example_input is None:
        raise ValueError(
            f"{', '.join(lazy)} still have uninitialized (lazy) parameters, so their weights have no shape yet: "
            "run one forward before converting, pass `example_input`, or (with the callbacks) set "
            "`example_input_array` on the LightningModule or give the Trainer a dataloader"
        )
    _probe(module, example_input, "materializing lazy modules")
    still = lazy_modules(module)
    if still:
        raise ValueError(f"the probe forward did not initialize the lazy modules {', '.join(still)}")
    return lazy


# ----------------------------------------------------------------------------------------------- plan


@dataclass
class WeightPlan:
    """What a weight conversion will do: the layers to quantize and why the others stay float."""

    sites: list[str]
    arguments: dict[str, Any]
    left_out: list[tuple[str, str]] = field(default_factory=list)
    kept_first_last: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)
    shared: dict[str, list[str]] = field(default_factory=dict)  # site -> the others holding its weight
    floats: list[tuple[str, str]] = field(default_factory=list)  # other float weights and why
    norms: int = 0  # normalisation layers (float by design)
    biases: int = 0
    materialized: list[str] = field(default_factory=list)  # lazy modules the probe initialised

    def recipe(self) -> dict[str, Any]:
        """The conversion recipe stored on the module and in checkpoints (see COMMON recipe protocol)."""
        return {
            "kind": RECIPE_KIND,
            "version": RECIPE_VERSION,
            "arguments": dict(self.arguments),
            "sites": list(self.sites),
        }

    def format(self, title: str = "quantize_weights_") -> str:
        """A human-readable plan: each quantized layer, then each float layer with the reason."""
        a = self.arguments
        kind = {1: "binary", 2: "ternary"}.get(a["bits"], f"{a['bits']}-bit")
        scale = {1: f"{a['binary_scale']}|W|", 2: f"{a['ternary_scale']} scale"}.get(
            a["bits"], "least squares"
        )
        gran = "per output channel" if a["per_channel"] else "per tensor"
        lines = [f"{title} plan: {len(self.sites)} layer(s) get {kind} weights ({scale}, {gran})"]
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
        return "\n".join(lines + rest)


def plan_weights(
    module: nn.Module,
    bits: int = 1,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_first_last: bool = False,
    per_channel: bool = False,
    ternary_scale: str = "twn",
    binary_scale: str = "mean",
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    example_input: Any = None,
) -> WeightPlan:
    """Decide which layers :func:`quantize_weights_` converts; changes nothing. ValueError when none is selected."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be an nn.Module, got {type(module).__name__}")
    inc, exc, types = check_weight_args(
        bits, per_channel, ternary_scale, binary_scale, keep_first_last, include, exclude, layer_types
    )
    arguments = {
        "bits": bits,
        "include": list(inc) if inc is not None else None,
        "exclude": list(exc) if exc is not None else None,
        "keep_first_last": keep_first_last,
        "per_channel": per_channel,
        "ternary_scale": ternary_scale,
        "binary_scale": binary_scale,
        "layer_types": [_type_name(t) for t in types],
    }
    materialized = materialize_lazy_(module, example_input)
    candidates = _candidates(module, types)
    if not candidates:
        raise ValueError(
            f"no layer with a float `weight` of `layer_types` {[t.__name__ for t in types]} in "
            f"{type(module).__name__} (already quantized layers are skipped; the callbacks convert after the "
            "LightningModule's `setup` and `configure_model`, so layers built there count)"
        )
    names = [n for n, _ in candidates]
    shapes = {n: (type(m).__name__, tuple(m.weight.shape)) for n, m in candidates}
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
    if keep_first_last:
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
        raise ValueError(
            f"nothing selected: `{culprit}` leaves no layer to quantize (include={arguments['include']}, "
            f"exclude={arguments['exclude']}, keep_first_last={keep_first_last}); candidates: {', '.join(names)}"
        )
    users = _weight_users(module)
    site_weight = {n: id(module.get_submodule(n).weight) for n in names}
    shared = {n: [u for u in users[w] if u != f"{n}.weight"] for n, w in site_weight.items() if w in users}
    quantized = {site_weight[n] for n in selected}
    floats, norms, biases = _float_leftovers(module, {id(m) for _, m in candidates}, types, quantized)
    return WeightPlan(
        selected, arguments, left_out, kept, shapes, shared, floats, norms, biases, materialized
    )


# -------------------------------------------------------------------------------------------- convert


def _make_quantizer(arguments: dict[str, Any], layer: nn.Module | None = None) -> WeightQuantizer:
    kwargs = {k: arguments[k] for k in QUANTIZER_ARGS if k in arguments}
    if isinstance(layer, _TRANSPOSED):
        return TransposedWeightQuantizer(groups=layer.groups, **kwargs)
    return WeightQuantizer(**kwargs)


def convert_sites_(module: nn.Module, sites: Sequence[str], arguments: dict[str, Any]) -> None:
    """Parametrize ``weight`` of each site with q(W); on any error undo the sites already done."""
    layers = []
    for name in sites:
        try:
            layer = module.get_submodule(name)
        except AttributeError as err:
            raise ValueError(f"recipe site {name!r} is not a submodule of {type(module).__name__}") from err
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"the weight of {name!r} is already parametrized; it cannot be quantized again")
        if not isinstance(layer._parameters.get("weight"), nn.Parameter):
            raise ValueError(f"{name!r} ({type(layer).__name__}) has no `weight` parameter to quantize")
        layers.append(layer)
        if is_lazy(layer._parameters["weight"]):
            raise ValueError(
                f"{name!r} ({type(layer).__name__}) is lazy and not initialized yet: run one forward first "
                "(see `materialize_lazy_`)"
            )
    _make_quantizer(arguments)  # validate the arguments before touching the module
    # A Parameter shared by several layers (tied weights) gets one quantizer: one latent, one q, one blend.
    quantizers = {}
    for layer in layers:
        weight = layer._parameters["weight"]
        if id(weight) not in quantizers:
            quantizers[id(weight)] = _make_quantizer(arguments, layer)
    done: list[nn.Module] = []
    try:
        for layer in layers:
            quantizer = quantizers[id(layer._parameters["weight"])]
            parametrize.register_parametrization(layer, "weight", quantizer)
            done.append(layer)
    except Exception:
        for layer in done:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        raise


def _record(module: nn.Module, recipe: dict[str, Any]) -> None:
    recipes = getattr(module, RECIPES_ATTR, None)
    if recipes is None:
        recipes = []
        # A plain attribute (not a buffer): the recipe travels in the checkpoint's "lightning_ste" entry.
        setattr(module, RECIPES_ATTR, recipes)
    recipes.append(recipe)


def apply_plan(module: nn.Module, plan: WeightPlan) -> list[str]:
    """Convert the plan's sites and record its recipe on ``module``; return the converted names."""
    convert_sites_(module, plan.sites, plan.arguments)
    _record(module, plan.recipe())
    return list(plan.sites)


def quantize_weights_(
    module: nn.Module,
    bits: int = 1,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    keep_first_last: bool = False,
    per_channel: bool = False,
    ternary_scale: str = "twn",
    binary_scale: str = "mean",
    layer_types: Sequence[type[nn.Module]] = DEFAULT_LAYER_TYPES,
    example_input: Any = None,
    dry_run: bool = False,
) -> list[str]:
    """Make each selected layer's weight q(W) (binary mean|W| sign(W), ternary TWN, b-bit) via ``parametrize`` (BCGD19); return the layer names.

    ``include``/``exclude`` are glob patterns over module names; ``layer_types`` the layer classes considered;
    ``keep_first_last=True`` keeps the first and last of them *in execution order* (a probe forward on
    ``example_input``) in float. ``dry_run=True`` prints the plan and changes nothing. The module is left
    unchanged on any error. The recipe is appended to ``module._lightning_ste_recipes``. Lazy modules
    (``nn.LazyLinear``, ...) are initialised first by a probe forward on ``example_input`` (on a copy when
    ``dry_run``). Layers sharing one weight Parameter share its latent and quantizer.
    """
    if not isinstance(dry_run, bool):
        raise ValueError(f"`dry_run` must be a bool, got {dry_run!r}")
    plan = plan_weights(
        copy.deepcopy(module) if dry_run and lazy_modules(module) else module, bits, include, exclude, keep_first_last, per_channel, ternary_scale, binary_scale, layer_types,
        example_input,
    )  # fmt: skip
    if dry_run:
        print(plan.format("quantize_weights_ (dry run, nothing changed)"))
        return list(plan.sites)
    return apply_plan(module, plan)


def apply_recipe(module: nn.Module, recipe: dict[str, Any]) -> list[str]:
    """Re-apply a stored weights recipe to a fresh module: exactly the recorded sites, the recorded arguments."""
    if not isinstance(recipe, dict) or recipe.get("kind") != RECIPE_KIND:
        raise ValueError(
            f"`recipe` must be a {RECIPE_KIND!r} recipe, got kind {getattr(recipe, 'get', dict)('kind')!r}"
        )
    if recipe.get("version") != RECIPE_VERSION:
        raise ValueError(
            f"unsupported weights recipe version {recipe.get('version')!r} (this is {RECIPE_VERSION})"
        )
    arguments = dict(recipe.get("arguments") or {})
    sites = list(recipe.get("sites") or [])
    if not sites:
        raise ValueError("weights recipe has no `sites`")
    convert_sites_(module, sites, arguments)
    _record(module, {**recipe, "arguments": arguments, "sites": sites})
    return sites


def set_quantizer_arguments_(
    module: nn.Module, arguments: dict[str, Any], sites: Sequence[str] | None = None
) -> None:
    """Give the quantizers of ``sites`` (all when None) the settings of ``arguments`` (q has no state to lose)."""
    new = _make_quantizer(arguments)
    for name, _, _, quantizer in quantized_layers(module):
        if sites is None or name in sites:
            for k in QUANTIZER_ARGS:
                setattr(quantizer, k, getattr(new, k))


def remove_quantization_(module: nn.Module, sites: Sequence[str] | None = None) -> list[str]:
    """Undo the weight quantization of ``sites`` (all when None): ``weight`` is the float latent W again."""
    removed = []
    for name, layer, _, _ in list(quantized_layers(module)):
        if sites is None or name in sites:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            # Put `weight` back in front, where torch layers register it, so parameter order (and thus the
            # optimizer's state indexing) is that of a layer that was never quantized.
            params = layer._parameters
            rest = {k: v for k, v in params.items() if k != "weight"}
            weight = params["weight"]
            params.clear()
            params.update({"weight": weight, **rest})
            removed.append(name)
    return removed


def layer_types_from_arguments(arguments: dict[str, Any]) -> tuple[type[nn.Module], ...]:
    """The layer classes a recipe's ``arguments`` name (qualified names)."""
    return tuple(_type_from_name(n) for n in arguments.get("layer_types") or []) or DEFAULT_LAYER_TYPES
