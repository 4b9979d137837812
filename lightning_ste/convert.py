"""Module surgery: turn each ReLU call site of any ``nn.Module`` into a QuantReLU, alpha * clamp(ceil(x / alpha), 0, L).

A *call site* is one place in some ``forward`` where a ReLU runs: an ``nn.ReLU`` module (in-place or not),
one call of an ``nn.ReLU`` instance that is called at several places (torchvision's ``BasicBlock`` calls
``self.relu`` twice), or a functional ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` / ``relu_`` call. Each
site gets its own :class:`~lightning_ste.modules.QuantReLU`, so its own alpha (YLZ19, BCGD19).

How sites are found: every module is traced on its own with :mod:`torch.fx`, all of its submodules kept
as leaves, so a functional ReLU is rewritten in the smallest module whose ``forward`` holds it. A module
whose ``forward`` is rewritten keeps its class, attributes and hooks: only its ``forward`` is replaced, on
the instance, by the code generated from the edited graph. A module that cannot be traced (data-dependent
control flow, a ``forward`` that depends on ``self.training``, ...) is left in float with one warning that
names it and says why; its ``nn.ReLU`` children are still converted, one quantizer per module.

PyTorch's Transformer layers hold ``activation="relu"`` as the plain function ``F.relu``: each such layer's
activation is a site too, and a converted layer runs with PyTorch's fused fast paths off. With
``targets=("relu", "relu6")`` ReLU6 modules and ``F.relu6`` calls are sites as well (a staircase capped at 6).
Tracing never changes the model: every attribute a forward assigns while traced is put back, and such a forward
is not rewritten (torch.fx records no attribute assignment).

The work is split in two: :func:`plan_activations` traces, names and selects without touching the model
(errors are raised there), :func:`apply_plan` then commits the plan with plain attribute assignments.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.graph_module import _format_import_block, _forward_from_src
from torch.nn.utils import parametrize
from torch.package import sys_importer

from lightning_ste import functional as F_ste
from lightning_ste.modules import QuantReLU
from lightning_ste.selection import check_patterns, select_names

__all__ = [
    "ALPHA_CHOICES",
    "ActivationPlan",
    "Site",
    "apply_plan",
    "apply_recipe",
    "check_activation_arguments",
    "format_plan",
    "plan_activations",
    "quantize_activations_",
]

ALPHA_CHOICES = ("learned", "fixed", "calibrate")
TARGET_CHOICES = ("relu", "relu6")
DEFAULT_TARGETS = ("relu",)
RELU6_TOP = 6.0
RECIPE_KIND = "activations"
RECIPE_VERSION = 1

# Functional ReLUs as torch.fx records them (F.relu_ is torch.relu_), per target.
_FUNCTIONS: dict[str, dict[Any, str]] = {
    "relu": {torch.nn.functional.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_"},
    "relu6": {torch.nn.functional.relu6: "F.relu6"},
}
_METHODS: dict[str, dict[str, str]] = {"relu": {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}, "relu6": {}}
_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}
# ReLU-like activations that stay float (listed at the end of the plan): modules and functions.
_RELU_LIKE_MODULES = (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Threshold)
_RELU_LIKE_FUNCTIONS = {
    torch.nn.functional.relu6: "F.relu6",
    torch.nn.functional.leaky_relu: "F.leaky_relu",
    torch.nn.functional.hardtanh: "F.hardtanh",
    torch.nn.functional.rrelu: "F.rrelu",
    torch.nn.functional.prelu: "F.prelu",
}
# PyTorch layers that keep their activation as a plain attribute (a function) and have a fused fast path.
_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


# ----------------------------------------------------------------------------------------------- arguments


def check_activation_arguments(
    bits: int = 4,
    ste: str = "clipped_relu",
    alpha: str | float = "learned",
    alpha_grad: str = "mean",
    alpha_lr_scale: float = 0.01,
    rounding: str = "ceil",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    calibration_batches: int = 1,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> dict[str, Any]:
    """Validate the conversion arguments; return them as a plain JSON-able dict (the recipe's ``arguments``).

    ``targets`` is recorded only when it is not the default ``("relu",)``, so recipes and callback state keys
    made before it existed stay valid.
    """
    F_ste.check_quantized_relu_args(bits, ste, alpha_grad, alpha_lr_scale, rounding)
    if (
        isinstance(targets, str)
        or not isinstance(targets, Sequence)
        or not targets
        or any(t not in TARGET_CHOICES for t in targets)
    ):
        raise ValueError(
            f"`targets` must be a non-empty list of {', '.join(map(repr, TARGET_CHOICES))}, got {targets!r}"
        )
    if isinstance(alpha, str):
        if alpha not in ALPHA_CHOICES:
            raise ValueError(
                f"unknown `alpha` {alpha!r}; allowed: 'learned', 'fixed', 'calibrate' or a number > 0"
            )
    elif (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not (math.isfinite(alpha) and alpha >= F_ste.ALPHA_FLOOR)
    ):
        # Below the floor the forward would clamp it: a value that cannot be used as given is refused.
        raise ValueError(
            "`alpha` must be one of 'learned', 'fixed', 'calibrate' or a finite number > 0 (at least the floor "
            f"{F_ste.ALPHA_FLOOR:g}), got {alpha!r}"
        )
    if (
        isinstance(calibration_batches, bool)
        or not isinstance(calibration_batches, int)
        or calibration_batches < 1
    ):
        raise ValueError(f"`calibration_batches` must be an int >= 1, got {calibration_batches!r}")
    inc, exc = check_patterns(include, "include"), check_patterns(exclude, "exclude")
    chosen = [t for t in TARGET_CHOICES if t in targets]
    extra = {} if tuple(chosen) == DEFAULT_TARGETS else {"targets": chosen}
    return {
        "bits": bits,
        "ste": ste,
        "alpha": alpha if isinstance(alpha, str) else float(alpha),
        "alpha_grad": alpha_grad,
        "alpha_lr_scale": float(alpha_lr_scale),
        "rounding": rounding,
        "include": None if inc is None else list(inc),
        "exclude": None if exc is None else list(exc),
        "calibration_batches": calibration_batches,
        **extra,
    }


def _targets(arguments: dict[str, Any]) -> tuple[str, ...]:
    return tuple(arguments.get("targets") or DEFAULT_TARGETS)


def _make_quantizer(arguments: dict[str, Any], target: str = "relu") -> QuantReLU:
    """The QuantReLU of one site for the given (validated) arguments.

    A ReLU6 site gets the staircase capped at 6: ``alpha = 6 / L`` fixed, so the top level ``L * alpha`` is 6
    (the clipped ReLU of YLZ19 with a fixed top), whatever ``alpha`` says.
    """
    alpha = arguments["alpha"]
    mode = alpha if isinstance(alpha, str) else "fixed"
    if target == "relu6":
        alpha, mode = RELU6_TOP / (2 ** arguments["bits"] - 1), "fixed"
    return QuantReLU(
        bits=arguments["bits"],
        alpha=None if isinstance(alpha, str) else alpha,
        alpha_mode=mode,
        ste=arguments["ste"],
        alpha_grad=arguments["alpha_grad"],
        alpha_lr_scale=arguments["alpha_lr_scale"],
        rounding=arguments["rounding"],
        calibration_batches=arguments["calibration_batches"],
    )


def _describe_alpha(arguments: dict[str, Any]) -> str:
    alpha = arguments["alpha"]
    init = F_ste.half_gaussian_resolution(arguments["bits"])
    if alpha == "learned":
        return f"learned (init {init:.4g})"
    if alpha == "fixed":
        return f"fixed {init:.4g}"
    if alpha == "calibrate":
        n = arguments["calibration_batches"]
        return f"calibrate ({n} batch{'es' if n > 1 else ''})"
    return f"fixed {alpha:.4g}"


# ------------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Site:
    """One ReLU call site and the name its QuantReLU gets."""

    name: str  # qualified name of the QuantReLU once converted
    kind: str  # "module" | "call" (one call of a shared nn.ReLU) | "function" | "attribute"
    source: str  # what runs there now, e.g. "nn.ReLU(inplace=True)", "F.relu"
    owner: str | None  # module whose forward holds the call ("" = root); None when not traced
    origin: str  # the nn.ReLU module the site comes from ("" for functional sites)
    call: tuple[int, int] | None = None  # (k, n): k-th of the n calls of a shared module
    target: str = "relu"  # "relu" or "relu6": the activation replaced (see `targets`)


@dataclass
class _Edit:
    """One change to a traced graph: the node of a site, what to call instead, in-place semantics."""

    site: Site
    node_name: str
    target: str  # call_module target relative to the owner
    inplace: bool
    changes: bool  # whether the owner's forward must be rewritten for this site


@dataclass
class _Owner:
    module: nn.Module
    graph: fx.Graph
    edits: list[_Edit] = field(default_factory=list)


@dataclass
class ActivationPlan:
    """What :func:`apply_plan` will do: sites converted, sites left out, modules that could not be traced."""

    arguments: dict[str, Any]
    sites: list[Site]
    left_out: list[Site]
    not_traced: list[tuple[str, str, str]]  # (module name, class name, reason)
    float_like: list[tuple[str, str]] = field(default_factory=list)  # (where, why): ReLU-like, kept float
    _locations: dict[str, tuple[nn.Module, str]] = field(default_factory=dict, repr=False)
    _owners: dict[str, _Owner] = field(default_factory=dict, repr=False)
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)  # filled by apply_plan

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sites]

    def warning(self) -> str | None:
        """The one warning about modules left in float because they could not be traced, or None."""
        if not self.not_traced:
            return None
        lines = [f"  {name or '<root>'} ({cls}): {reason}" for name, cls, reason in self.not_traced]
        return (
            "lightning_ste: these modules could not be traced with torch.fx, so the functional ReLUs in their"
            " forward stay float (their nn.ReLU children are converted, one quantizer per module):\n"
            + "\n".join(lines)
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def _is_relu_module(m: nn.Module | None, targets: Sequence[str] = DEFAULT_TARGETS) -> bool:
    return m is not None and _module_target(m, targets) is not None


def _module_target(m: nn.Module, targets: Sequence[str]) -> str | None:
    """The target ("relu", "relu6") whose module class ``m`` is exactly an instance of, if selected."""
    for t in targets:
        if isinstance(m, _MODULES[t]):
            return t
    return None


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every submodule (QuantReLU, nn.ReLU, parametrized, ...) is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root


def _wants_trace(m: nn.Module) -> bool:
    """Whether ``m``'s own forward may hold ReLU calls worth tracing (torch built-ins are leaves)."""
    if isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward:
        # Its forward calls the children in order: only ReLU children (maybe shared) make it worth a trace.
        return any(isinstance(c, (nn.ReLU, nn.ReLU6)) for c in m.children())
    if isinstance(m, nn.Sequential):
        return True
    if isinstance(m, (QuantReLU, nn.ModuleList, nn.ModuleDict)) or parametrize.is_parametrized(m):
        return False
    module = type(m).__module__ or ""
    if module.startswith("torch.") or module == "torch":
        return False
    return type(m).forward is not nn.Module.forward


def _mentions_relu(m: nn.Module) -> bool:
    """Whether a module left untraced could hold ReLUs: nn.ReLU children or 'relu' in its forward's source."""
    if any(isinstance(c, (nn.ReLU, nn.ReLU6)) for c in m.children()):
        return True
    try:
        return "relu" in inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return True  # unknown source: say so rather than stay silent


def _graph_key(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def _snapshot(m: nn.Module) -> list[tuple[nn.Module, list[tuple[dict[str, Any], dict[str, Any]]]]]:
    """Shallow copies of the attribute dicts of ``m`` and its submodules (tracing may assign to any of them)."""
    return [
        (sub, [(d, dict(d)) for d in (sub.__dict__, sub._parameters, sub._buffers, sub._modules)])
        for sub in m.modules()
    ]


def _restore(snapshot: list[tuple[nn.Module, list[tuple[dict[str, Any], dict[str, Any]]]]]) -> list[str]:
    """Put every dict of :func:`_snapshot` back as it was; return the names that tracing had changed."""
    changed = []
    for _sub, dicts in snapshot:
        for live, saved in dicts:
            keys = set(live) | set(saved)
            diff = [k for k in keys if k not in live or k not in saved or live[k] is not saved[k]]
            if diff:
                changed += diff
                live.clear()
                live.update(saved)
    return sorted(set(changed))


def _trace_own_forward(m: nn.Module) -> tuple[fx.Graph | None, str]:
    """fx graph of ``m``'s own forward, or (None, reason) when it cannot be traced faithfully.

    Tracing never changes the model: every attribute dict of ``m`` and its submodules is restored after it.
    A forward that assigns attributes (``self.mask = ...``) is not traced, since the fx graph would drop the
    assignment.
    """
    existing = m.__dict__.get("forward")
    if isinstance(existing, _TracedForward):
        if existing.graph is None:
            return None, "its forward was rewritten before and restored from a pickle (no graph kept)"
        return copy.deepcopy(existing.graph), ""
    if existing is not None and not _is_lightning_compiled_forward(m):
        return None, "its forward is replaced on the instance"
    modes = [(sub, sub.training) for sub in m.modules()]
    snapshot = _snapshot(m)
    graphs = []
    error: str | None = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # nn.Sequential's own forward never reads self.training: one trace is enough.
            plain = isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward
            for training in (True,) if plain else (True, False):
                m.train(training)
                graphs.append(_OwnForwardTracer().trace(m))
    except Exception as err:  # noqa: BLE001 - any tracing failure leaves the module in float
        text = str(err).strip().splitlines()
        error = f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")
    finally:
        for sub, training in modes:
            sub.training = training
        changed = _restore(snapshot)
    constants = [k for k in changed if k.startswith("_tensor_constant")]
    assigned = [k for k in changed if not k.startswith("_tensor_constant") and k != "training"]
    if assigned:
        names = ", ".join(f"self.{k}" for k in assigned[:4]) + (", ..." if len(assigned) > 4 else "")
        why = f"its forward assigns {names} (torch.fx records no attribute assignment)"
        return None, why if error is None else f"{why}; tracing then failed with {error}"
    if error is not None:
        return None, error
    if constants:
        return None, "its forward creates tensors while tracing (they would be frozen as constants)"
    if len(graphs) > 1 and _graph_key(graphs[0]) != _graph_key(graphs[1]):
        return None, "its forward depends on self.training (tracing would freeze one mode)"
    return graphs[0], ""


def _is_lightning_compiled_forward(m: nn.Module) -> bool:
    """Lightning's ``from_compiled`` wraps the class forward of a compiled LightningModule on the instance."""
    ctx = getattr(m, "_compiler_ctx", None)
    original = ctx.get("original_forward") if isinstance(ctx, dict) else None
    return getattr(original, "__self__", None) is m and getattr(original, "__func__", None) is type(m).forward


def _function_site(node: fx.Node, targets: Sequence[str]) -> tuple[str, bool, str] | None:
    """(source, inplace, target) when ``node`` is a functional activation of ``targets``."""
    for t in targets:
        if node.op == "call_function" and node.target in _FUNCTIONS[t]:
            inplace = node.target is torch.relu_ or bool(
                node.kwargs.get("inplace", node.args[1:2] == (True,))
            )
            return _FUNCTIONS[t][node.target], inplace, t
        if node.op == "call_method" and node.target in _METHODS[t]:
            return _METHODS[t][node.target], node.target == "relu_", t
    return None


def _relu_like_call(node: fx.Node) -> str | None:
    """What a functional ReLU-like call that is not converted is: F.relu6, F.leaky_relu, clamp(min=0), ..."""
    if node.op == "call_function" and node.target in _RELU_LIKE_FUNCTIONS:
        return _RELU_LIKE_FUNCTIONS[node.target]
    clamp = node.op == "call_function" and node.target in (torch.clamp, torch.clamp_min, torch.clip)
    clamp = clamp or (node.op == "call_method" and node.target in ("clamp", "clamp_", "clamp_min", "clip"))
    if clamp:
        low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        if isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0:
            return f"{node.target if isinstance(node.target, str) else node.target.__name__}(min=0)"
    return None


def _read_after(node: fx.Node) -> bool:
    """Whether the input of an in-place ReLU ``node`` is read again later (so the in-place effect matters)."""
    value = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(value, fx.Node):
        return False
    later, seen = set(), False
    for n in node.graph.nodes:
        if n is node:
            seen = True
        elif seen:
            later.add(n)
    return any(user in later for user in value.users)


def _free_name(parent: nn.Module, base: str, taken: set[tuple[int, str]]) -> str:
    name = base
    while hasattr(parent, name) or (id(parent), name) in taken:
        name += "_"
    taken.add((id(parent), name))
    return name


def plan_activations(
    module: nn.Module,
    bits: int = 4,
    ste: str = "clipped_relu",
    alpha: str | float = "learned",
    alpha_grad: str = "mean",
    alpha_lr_scale: float = 0.01,
    rounding: str = "ceil",
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    calibration_batches: int = 1,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> ActivationPlan:
    """Find, name and select the ReLU call sites of ``module`` without changing it.

    Raises ``ValueError`` when no ReLU is found, when an ``include`` pattern matches no site, or when no site
    is left after ``include``/``exclude``. Patterns are globs over the site names (see :func:`format_plan`);
    the call sites of a shared ``nn.ReLU`` also match that module's own name. ``targets=("relu", "relu6")``
    also converts ReLU6 (``nn.ReLU6``, ``F.relu6``) to a staircase capped at 6.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be an nn.Module, got {type(module).__name__}")
    arguments = check_activation_arguments(
        bits, ste, alpha, alpha_grad, alpha_lr_scale, rounding, include, exclude, calibration_batches, targets
    )
    targets = _targets(arguments)
    if _is_relu_module(module, targets):
        raise ValueError(f"`module` is itself an {type(module).__name__}: convert the module that holds it")

    # Where each nn.ReLU sits: (parent, attribute) -> first qualified name (a module may sit in several).
    locations: dict[tuple[int, str], str] = {}
    holders: dict[str, tuple[nn.Module, str]] = {}
    float_like: list[tuple[str, str]] = []
    like_counts: dict[str, int] = {}

    def note(where: str, what: str) -> None:
        float_like.append((where, _float_reason(what)))
        like_counts[what] = like_counts.get(what, 0) + 1

    relu_like_seen: set[int] = set()
    for parent_name, parent in module.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is not None and _is_relu_module(child, targets) and (id(parent), attr) not in locations:
                name = _join(parent_name, attr)
                locations[(id(parent), attr)] = name
                holders[name] = (parent, attr)
            elif isinstance(child, _RELU_LIKE_MODULES) and id(child) not in relu_like_seen:
                relu_like_seen.add(id(child))
                note(f"{_join(parent_name, attr)} (nn.{type(child).__name__})", f"nn.{type(child).__name__}")

    taken: set[tuple[int, str]] = set()
    sites: list[Site] = []
    owners: dict[str, _Owner] = {}
    not_traced: list[tuple[str, str, str]] = []
    calls: dict[str, list[tuple[str, fx.Node, bool]]] = {}  # location -> [(owner, node, inplace)]
    functional: list[tuple[str, fx.Node, str, bool, str]] = []
    for owner_name, owner in module.named_modules():
        if not _wants_trace(owner):
            continue
        graph, reason = _trace_own_forward(owner)
        if graph is None:
            if _mentions_relu(owner):
                not_traced.append((owner_name, type(owner).__qualname__, reason))
            continue
        owners[owner_name] = _Owner(owner, graph)
        for node in graph.nodes:
            if node.op == "call_module":
                prefix, _, attr = node.target.rpartition(".")
                parent = owner.get_submodule(prefix)
                if _is_relu_module(parent._modules.get(attr), targets):
                    location = locations[(id(parent), attr)]
                    calls.setdefault(location, []).append(
                        (owner_name, node, bool(parent._modules[attr].inplace))
                    )
            elif (found := _function_site(node, targets)) is not None:
                functional.append((owner_name, node, *found))
            elif (like := _relu_like_call(node)) is not None:
                note(f"{like} in {owner_name or '<root>'}.forward", like)

    edits: list[_Edit] = []
    counters: dict[str, int] = {}
    for location, holder in list(holders.items()):
        relu = holder[0]._modules[holder[1]]
        target = _module_target(relu, targets) or "relu"
        source = f"nn.{type(relu).__name__}({'inplace=True' if relu.inplace else ''})"
        found = calls.get(location, [])
        if len(found) <= 1:
            owner_name = found[0][0] if found else None
            site = Site(location, "module", source, owner_name, location, target=target)
            sites.append(site)
            if found:
                owner_name, node, inplace = found[0]
                changes = inplace and _read_after(node)
                edits.append(_Edit(site, node.name, node.target, inplace, changes))
            continue
        parent, attr = holder
        for k, (owner_name, node, inplace) in enumerate(found):
            new_attr = attr if k == 0 else _free_name(parent, f"{attr}_{k}", taken)
            name = _join(location.rpartition(".")[0], new_attr)
            site = Site(name, "call", source, owner_name, location, (k + 1, len(found)), target)
            target_attr = _join(node.target.rpartition(".")[0], new_attr)
            sites.append(site)
            edits.append(
                _Edit(site, node.name, target_attr, inplace, k > 0 or (inplace and _read_after(node)))
            )
            holders.setdefault(name, (parent, new_attr))
    for owner_name, node, source, inplace, target in functional:
        owner = owners[owner_name].module
        k = counters.get(owner_name, 0)
        counters[owner_name] = k + 1
        attr = _free_name(owner, f"relu_fx_{k}", taken)
        site = Site(_join(owner_name, attr), "function", source, owner_name, "", target=target)
        sites.append(site)
        edits.append(_Edit(site, node.name, attr, inplace, True))
        holders[site.name] = (owner, attr)
    # PyTorch's Transformer layers keep `activation="relu"` as the plain function F.relu (an attribute, not a
    # module, so no trace sees it): the layer's own QuantReLU takes its place (and its fast path is disabled).
    for layer_name, layer in module.named_modules():
        if isinstance(layer, _TRANSFORMER_LAYERS) and "activation" not in layer._modules:
            fn = layer.__dict__.get("activation")
            target = next((t for t in targets if fn in _FUNCTIONS[t]), None)
            if target is not None:
                source = f"{_FUNCTIONS[target][fn]} (activation of {type(layer).__name__})"
                site = Site(
                    _join(layer_name, "activation"), "attribute", source, layer_name, "", target=target
                )
                sites.append(site)
                holders[site.name] = (layer, "activation")
            elif fn in _RELU_LIKE_FUNCTIONS:
                like = _RELU_LIKE_FUNCTIONS[fn]
                note(f"{_join(layer_name, 'activation')} ({like})", like)

    if not sites:
        counts = ", ".join(f"{n} {what}" for what, n in like_counts.items())
        seen = f" It saw ReLU-like activations it does not convert: {counts}." if counts else ""
        if any("relu6" in what.lower() for what in like_counts) and "relu6" not in targets:
            seen += " Pass `targets=('relu', 'relu6')` to convert ReLU6 too."
        raise ValueError(
            f"no ReLU found in {type(module).__qualname__}: looked for {_looked_for(targets)} in traceable "
            "forwards (the callbacks convert after the LightningModule's `setup` and `configure_model`, so layers "
            "built there count)."
            + seen
            + (f" Not traced: {', '.join(n or '<root>' for n, _, _ in not_traced)}." if not_traced else "")
        )
    selected, unmatched = _select(sites, arguments["include"], arguments["exclude"])
    if unmatched:
        raise ValueError(
            f"`include` pattern(s) {unmatched} match no ReLU site of {type(module).__qualname__}; "
            f"sites: {_preview([s.name for s in sites])}"
        )
    if not selected:
        raise ValueError(
            f"no ReLU site left after include={arguments['include']} exclude={arguments['exclude']}: `exclude` "
            f"removes every selected site; sites: {_preview([s.name for s in sites])}"
        )
    chosen = {s.name for s in selected}
    for edit in edits:
        if edit.site.name in chosen and edit.site.owner is not None:
            owners[edit.site.owner].edits.append(edit)
    return ActivationPlan(
        arguments=arguments,
        sites=selected,
        left_out=[s for s in sites if s.name not in chosen],
        not_traced=not_traced,
        float_like=float_like,
        _locations={s.name: holders[s.name] for s in selected},
        _owners={n: o for n, o in owners.items() if any(e.changes for e in o.edits)},
    )


def _looked_for(targets: Sequence[str]) -> str:
    parts = []
    if "relu" in targets:
        parts.append("nn.ReLU modules, F.relu / torch.relu / Tensor.relu / relu_ calls")
    if "relu6" in targets:
        parts.append("nn.ReLU6 modules, F.relu6 calls")
    return " and ".join(parts) + ", the activation of nn.TransformerEncoderLayer / DecoderLayer"


def _float_reason(what: str) -> str:
    if what in ("nn.ReLU6", "F.relu6"):
        return "ReLU6 is not in `targets` (targets=('relu', 'relu6') converts it, capped at 6)"
    if "clamp" in what or "clip" in what:
        return "clamp(min=0) is ReLU-like but not a ReLU call; use F.relu to quantize it"
    return "ReLU-like but not a ReLU; not converted"


def _select(sites: list[Site], include: list[str] | None, exclude: list[str] | None):
    """Sites matching ``include`` and no ``exclude`` by their name or, for shared calls, their module's name."""
    candidates = {s.name: [s.name] + ([s.origin] if s.kind == "call" else []) for s in sites}
    every = sorted({c for cs in candidates.values() for c in cs})
    included, _, unmatched = select_names(every, include, None)
    _, excluded, _ = select_names(every, None, exclude)
    inc, exc = set(included), set(excluded)
    chosen = [
        s
        for s in sites
        if any(c in inc for c in candidates[s.name]) and not any(c in exc for c in candidates[s.name])
    ]
    return chosen, unmatched


def _preview(names: list[str], limit: int = 12) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ------------------------------------------------------------------------------------------ rewriting


class _TracedForward:
    """A module's forward generated from its edited fx graph, bound to the module; picklable and copyable.

    Set as ``module.forward`` on the instance, so the module keeps its class, attributes and hooks.
    """

    def __init__(self, owner: nn.Module, src: str, import_block: str, graph: fx.Graph | None = None) -> None:
        self.owner, self.src, self.import_block, self.graph = owner, src, import_block, graph
        self._fn = _forward_from_src(import_block + "\n" + src, {})
        parameters = list(inspect.signature(self._fn).parameters.values())[1:]
        self.__signature__ = inspect.Signature(parameters)
        # Lightning's `is_overridden` reads `__wrapped__.__code__`; `__signature__` keeps `inspect` on the
        # bound signature (without `self`).
        self.__wrapped__ = self._fn
        self.__name__ = self.__qualname__ = "forward"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self.owner, *args, **kwargs)

    def __reduce__(self):
        return (_TracedForward, (self.owner, self.src, self.import_block))

    def __deepcopy__(self, memo: dict[int, Any]) -> _TracedForward:
        owner = copy.deepcopy(self.owner, memo)
        if id(self) in memo:  # reached again through the owner's __dict__
            return memo[id(self)]
        clone = _TracedForward(owner, self.src, self.import_block, copy.deepcopy(self.graph))
        memo[id(self)] = clone
        return clone

    def __repr__(self) -> str:
        return f"<lightning_ste traced forward of {type(self.owner).__qualname__}>"


class _NoFastPathForward:
    """The class forward of a converted Transformer layer, run with PyTorch's fused attention fast path off."""

    def __init__(self, owner: nn.Module) -> None:
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        enabled = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return type(self.owner).forward(self.owner, *args, **kwargs)
        finally:
            torch.backends.mha.set_fastpath_enabled(enabled)

    def __repr__(self) -> str:
        return f"<lightning_ste forward of {type(self.owner).__qualname__}, fused fast path off>"


def _rewire_later_uses(graph: fx.Graph, old: fx.Node, new: fx.Node) -> None:
    """An in-place ReLU changed ``old`` for every later reader: make those readers read ``new`` instead."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for user in list(old.users):
        if user is not new and order[user] > order[new]:
            user.replace_input_with(old, new)


def _edited_graph(owner: _Owner) -> fx.Graph:
    graph = copy.deepcopy(owner.graph)
    nodes = {n.name: n for n in graph.nodes}
    for edit in owner.edits:
        node = nodes[edit.node_name]
        value = node.args[0] if node.args else node.kwargs.get("input")
        if node.op == "call_module":
            node.target = edit.target
            new = node
        else:
            with graph.inserting_after(node):
                new = graph.call_module(edit.target, (value,))
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        if edit.inplace and isinstance(value, fx.Node):
            _rewire_later_uses(graph, value, new)
    graph.lint()
    return graph


def _import_block(globals_: dict[str, Any]) -> str:
    """The import block of generated code. String globals (PEP 563 annotations of a ``forward`` in a module
    with ``from __future__ import annotations``) are assigned, as newer torch does; older torch's
    ``_format_import_block`` fails on them."""
    strings = sorted(f"{name} = {obj!r}" for name, obj in globals_.items() if isinstance(obj, str))
    others = {name: obj for name, obj in globals_.items() if not isinstance(obj, str)}
    return "\n".join([*strings, _format_import_block(others, sys_importer)])


def _compile_forward(module: nn.Module, graph: fx.Graph) -> _TracedForward:
    code = graph.python_code(root_module="self")
    return _TracedForward(module, code.src, _import_block(code.globals), graph)


def apply_plan(module: nn.Module, plan: ActivationPlan) -> list[str]:
    """Commit ``plan`` to ``module``: install the QuantReLUs, rewrite the forwards, record the recipe."""
    # Everything that can fail (code generation) happens before the first assignment.
    forwards = {name: _compile_forward(o.module, _edited_graph(o)) for name, o in plan._owners.items()}
    quantizers = {site.name: _make_quantizer(plan.arguments, site.target) for site in plan.sites}
    undo = plan._undo
    undo.clear()
    for site in plan.sites:
        parent, attr = plan._locations[site.name]
        undo.append(_restorer(parent, attr, parent._modules.get(attr, _ABSENT)))
        if attr in parent.__dict__:  # a function held as a plain attribute (Transformer layers)
            undo.append(_restorer(parent.__dict__, attr, parent.__dict__[attr]))
        setattr(parent, attr, quantizers[site.name])
        if isinstance(parent, _TRANSFORMER_LAYERS) and attr == "activation":
            # The fused fast paths (eval, no grad) would compute a float ReLU, bypassing the QuantReLU, and
            # fused attention rounds differently: both off, so train and eval run the same Python code.
            if isinstance(parent, nn.TransformerEncoderLayer):
                flag = parent.activation_relu_or_gelu
                undo.append(_restorer(parent.__dict__, "activation_relu_or_gelu", flag))
                parent.activation_relu_or_gelu = 0
            if not isinstance(parent.__dict__.get("forward"), _NoFastPathForward):
                undo.append(_restorer(parent, "forward", parent.__dict__.get("forward", _ABSENT)))
                parent.forward = _NoFastPathForward(parent)
    for name, forward in forwards.items():
        owner = plan._owners[name].module
        undo.append(_restorer(owner, "forward", owner.__dict__.get("forward", _ABSENT)))
        if "forward" in owner.__dict__ and _is_lightning_compiled_forward(owner):
            ctx = owner._compiler_ctx
            undo.append(_restorer(ctx, "original_forward", ctx["original_forward"]))
            ctx["original_forward"] = forward
            owner.forward = ctx["dynamo_ctx"](forward)
        else:
            owner.forward = forward
    recipes = module.__dict__.get("_lightning_ste_recipes")
    if recipes is None:
        recipes = []
        module._lightning_ste_recipes = recipes
    recipe = {
        "kind": RECIPE_KIND,
        "version": RECIPE_VERSION,
        "arguments": copy.deepcopy(plan.arguments),
        "sites": plan.names,
    }
    recipes.append(recipe)
    undo.append(lambda: _drop_recipe(module, recipe))
    return plan.names


def revert_plan(plan: ActivationPlan) -> None:
    """Undo :func:`apply_plan`: the ReLUs, forwards and recipe list exactly as they were before it."""
    while plan._undo:
        plan._undo.pop()()


_ABSENT = object()


def _drop_recipe(module: nn.Module, recipe: dict[str, Any]) -> None:
    recipes = module.__dict__.get("_lightning_ste_recipes") or []
    recipes[:] = [r for r in recipes if r is not recipe]
    if not recipes:
        module.__dict__.pop("_lightning_ste_recipes", None)


def _restorer(obj: Any, name: str, old: Any) -> Callable[[], None]:
    """Put back ``obj``'s ``name`` (a child module, an instance attribute or a dict entry) as it was."""

    def restore() -> None:
        if isinstance(obj, dict):
            obj[name] = old
        elif old is _ABSENT and name in obj._modules:
            delattr(obj, name)
        elif old is _ABSENT:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, old)

    return restore


# ----------------------------------------------------------------------------------------------- printing


def format_plan(plan: ActivationPlan, dry_run: bool = False) -> str:
    """The plan as a table: each converted site with bits, STE and alpha mode; what was left out and why."""
    a = plan.arguments
    alpha = _describe_alpha(a)
    head = "would convert" if dry_run else "converts"
    lines = [f"QuantizeActivations {head} {len(plan.sites)} ReLU call site(s) to QuantReLU:"]
    width = max(len(s.name) for s in plan.sites + plan.left_out)
    for s in plan.sites:
        where = {
            "module": s.source,
            "call": f"call {s.call[0]}/{s.call[1]} of shared {s.origin}" if s.call else s.source,
            "function": f"{s.source} in {s.owner or '<root>'}.forward",
            "attribute": f"{s.source}; fused fast path off",
        }[s.kind]
        if s.target == "relu6":
            where += f" (capped at {RELU6_TOP:g}: alpha fixed {RELU6_TOP / (2 ** a['bits'] - 1):.4g})"
        lines.append(
            f"  {s.name:<{width}}  bits={a['bits']} ste={a['ste']} alpha={alpha} "
            f"alpha_grad={a['alpha_grad']} rounding={a['rounding']}  <- {where}"
        )
    if plan.left_out:
        lines.append(
            f"Left out by include={a['include']} exclude={a['exclude']} ({len(plan.left_out)}): "
            + ", ".join(s.name for s in plan.left_out)
        )
    floats = [(w, r) for w, r in plan.float_like]
    floats += [
        (f"{n or '<root>'} ({c})", f"Not traced, its functional ReLUs stay float: {r}")
        for n, c, r in plan.not_traced
    ]
    if floats:
        lines.append(f"Stays float ({len(floats)}):")
        lines += [f"  {w}: {r}" for w, r in floats]
    else:
        lines.append("Stays float: no other ReLU-like activation found.")
    if dry_run:
        lines.append("dry_run=True: the model was not changed.")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry points


def _recipes(module: nn.Module) -> list[dict[str, Any]]:
    return list(module.__dict__.get("_lightning_ste_recipes") or [])


def find_recipe(module: nn.Module, arguments: dict[str, Any]) -> dict[str, Any] | None:
    """The activations recipe of ``module`` made with exactly ``arguments``, if any."""
    for recipe in _recipes(module):
        if recipe.get("kind") == RECIPE_KIND and recipe.get("arguments") == arguments:
            return recipe
    return None


def quantize_activations_(
    module: nn.Module,
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
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> list[str]:
    """Turn every ReLU call site of ``module`` into a b-bit QuantReLU in place: y = alpha * clamp(ceil(x / alpha), 0, L) (YLZ19, BCGD19).

    ``targets=("relu", "relu6")`` converts ReLU6 too, to the staircase capped at 6 (``alpha = 6 / L`` fixed).
    ``alpha``: ``"learned"`` (init ``half_gaussian_resolution(bits)``, trained with the BCGD19 proxy),
    ``"fixed"`` (that value, frozen), ``"calibrate"`` (``max|x| / L`` over the first ``calibration_batches``
    training batches, then frozen) or a number (frozen). Returns the names of the converted sites;
    ``dry_run=True`` prints the plan and changes nothing. The model is unchanged when an error is raised.
    """
    if not isinstance(dry_run, bool):
        raise ValueError(f"`dry_run` must be a bool, got {dry_run!r}")
    plan = plan_activations(
        module, bits, ste, alpha, alpha_grad, alpha_lr_scale, rounding, include, exclude, calibration_batches,
        targets,
    )  # fmt: skip
    if (message := plan.warning()) is not None:
        warnings.warn(message, UserWarning, stacklevel=2)
    if dry_run:
        print(format_plan(plan, dry_run=True))
        return plan.names
    return apply_plan(module, plan)


def apply_recipe(module: nn.Module, recipe: dict[str, Any]) -> list[str]:
    """Re-apply one recorded activations recipe to a fresh model: convert exactly the recorded sites."""
    if not isinstance(recipe, dict) or recipe.get("kind") != RECIPE_KIND:
        raise ValueError(f"not an activations recipe: {recipe!r}")
    if recipe.get("version") != RECIPE_VERSION:
        raise ValueError(
            f"unsupported activations recipe version {recipe.get('version')!r}; known: {RECIPE_VERSION}"
        )
    arguments = dict(recipe["arguments"])
    recorded = list(recipe["sites"])
    plan = plan_activations(module, **{**arguments, "include": None, "exclude": None})
    by_name = {s.name: s for s in plan.sites}
    missing = [n for n in recorded if n not in by_name]
    if missing:
        raise ValueError(
            f"the recipe's sites {missing} are not ReLU call sites of {type(module).__qualname__}; "
            f"found: {_preview(list(by_name))}"
        )
    keep = set(recorded)
    plan.sites = [by_name[n] for n in recorded]
    plan.left_out = [s for s in by_name.values() if s.name not in keep]
    for owner in plan._owners.values():
        owner.edits = [e for e in owner.edits if e.site.name in keep]
    plan._owners = {n: o for n, o in plan._owners.items() if any(e.changes for e in o.edits)}
    plan.arguments = arguments
    return apply_plan(module, plan)
