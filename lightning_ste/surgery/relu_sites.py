"""The ReLU call sites of any ``nn.Module``, and the ReLU-like activations that stay float (and why).

A *call site* is one place in some ``forward`` where a ReLU runs: an ``nn.ReLU`` module (in-place or not),
one call of an ``nn.ReLU`` instance that is called at several places (torchvision's ``BasicBlock`` calls
``self.relu`` twice), or a functional ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` / ``relu_`` call. Each
site gets its own QuantReLU, so its own alpha. Functional ReLUs are found by tracing each module's own
forward (:mod:`.fx_rewrite`). PyTorch's Transformer layers hold ``activation="relu"`` as the plain function
``F.relu``: each such layer's activation is a site too. With ``targets=("relu", "relu6")`` ReLU6 modules and
``F.relu6`` calls are sites as well.

Nothing ReLU-like is left unnamed: ReLU6 (unless targeted), LeakyReLU, PReLU, RReLU, Hardtanh, Threshold,
``clamp(min=0)`` and the modules that could not be traced are listed at the end of the plan, and the
"no ReLU found" error counts them.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from lightning_ste._compat import module_slots
from lightning_ste.surgery.fx_rewrite import Edit, TracedOwner, read_after, trace_own_forward, wants_trace
from lightning_ste.surgery.plan import qualified, select_names

__all__ = ["TRANSFORMER_LAYERS", "FoundSites", "Holder", "Leftovers", "Site", "find_sites", "select_sites"]

# Functional ReLUs as torch.fx records them (F.relu_ is torch.relu_), per target.
_FUNCTIONS: dict[str, dict[Any, str]] = {
    "relu": {torch.nn.functional.relu: "F.relu", torch.relu: "torch.relu", torch.relu_: "torch.relu_"},
    "relu6": {torch.nn.functional.relu6: "F.relu6"},
}
_METHODS: dict[str, dict[str, str]] = {"relu": {"relu": "Tensor.relu", "relu_": "Tensor.relu_"}, "relu6": {}}
_MODULES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu6": nn.ReLU6}
# PyTorch layers that keep their activation as a plain attribute (a function) and have a fused fast path.
TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
Holder = tuple[nn.Module, str]  # (parent, attribute) where a site's QuantReLU goes


# ----------------------------------------------------------------------------------- what stays float

# ReLU-like activations that stay float: modules and functions (as torch.fx records them).
_RELU_LIKE_MODULES = (nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.Hardtanh, nn.Threshold)
_RELU_LIKE_FUNCTIONS = {
    torch.nn.functional.relu6: "F.relu6",
    torch.nn.functional.leaky_relu: "F.leaky_relu",
    torch.nn.functional.hardtanh: "F.hardtanh",
    torch.nn.functional.rrelu: "F.rrelu",
    torch.nn.functional.prelu: "F.prelu",
}


def _relu_like_call(node: fx.Node) -> str | None:
    """What a functional ReLU-like call that is not converted is: F.relu6, F.leaky_relu, clamp(min=0), ..."""
    if node.op == "call_function" and node.target in _RELU_LIKE_FUNCTIONS:
        return _RELU_LIKE_FUNCTIONS[node.target]
    clamp = node.op == "call_function" and node.target in (torch.clamp, torch.clamp_min, torch.clip)
    clamp = clamp or (node.op == "call_method" and node.target in ("clamp", "clamp_", "clamp_min", "clip"))
    if clamp:
        low = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        if isinstance(low, (int, float)) and not isinstance(low, bool) and low == 0:
            target = node.target
            return f"{target if isinstance(target, str) else getattr(target, '__name__', target)}(min=0)"
    return None


def _mentions_relu(m: nn.Module) -> bool:
    """Whether a module left untraced could hold ReLUs: nn.ReLU children or 'relu' in its forward's source."""
    if any(isinstance(c, (nn.ReLU, nn.ReLU6)) for c in m.children()):
        return True
    try:
        return "relu" in inspect.getsource(type(m).forward)
    except (OSError, TypeError):
        return True  # unknown source: say so rather than stay silent


def _float_reason(what: str) -> str:
    if what in ("nn.ReLU6", "F.relu6"):
        return "ReLU6 is not in `targets` (targets=('relu', 'relu6') converts it, capped at 6)"
    if "clamp" in what or "clip" in what:
        return "clamp(min=0) is ReLU-like but not a ReLU call; use F.relu to quantize it"
    return "ReLU-like but not a ReLU; not converted"


def _looked_for(targets: Sequence[str]) -> str:
    parts = []
    if "relu" in targets:
        parts.append("nn.ReLU modules, F.relu / torch.relu / Tensor.relu / relu_ calls")
    if "relu6" in targets:
        parts.append("nn.ReLU6 modules, F.relu6 calls")
    return " and ".join(parts) + ", the activation of nn.TransformerEncoderLayer / DecoderLayer"


class Leftovers:
    """The ReLU-like activations a plan saw and does not convert, each with where it is and why it stays."""

    def __init__(self) -> None:
        self.float_like: list[tuple[str, str]] = []  # (where, why)
        self.counts: dict[str, int] = {}  # what -> how many

    def note(self, where: str, what: str) -> None:
        self.float_like.append((where, _float_reason(what)))
        self.counts[what] = self.counts.get(what, 0) + 1

    def no_relu_error(
        self, module: nn.Module, targets: Sequence[str], not_traced: Sequence[tuple[str, str, str]]
    ) -> ValueError:
        """The error of a model without any site: what was looked for, what was seen, what was not traced."""
        counts = ", ".join(f"{n} {what}" for what, n in self.counts.items())
        seen = f" It saw ReLU-like activations it does not convert: {counts}." if counts else ""
        if any("relu6" in what.lower() for what in self.counts) and "relu6" not in targets:
            seen += " Pass `targets=('relu', 'relu6')` to convert ReLU6 too."
        return ValueError(
            f"no ReLU found in {type(module).__qualname__}: looked for {_looked_for(targets)} in traceable "
            "forwards (the callbacks convert after the LightningModule's `setup` and `configure_model`, so layers "
            "built there count)."
            + seen
            + (f" Not traced: {', '.join(n or '<root>' for n, _, _ in not_traced)}." if not_traced else "")
        )


# ---------------------------------------------------------------------------------------------- sites


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


def _module_target(m: nn.Module | None, targets: Sequence[str]) -> str | None:
    """The target ("relu", "relu6") whose module class ``m`` is an instance of, if selected."""
    return next((t for t in targets if isinstance(m, _MODULES[t])), None)


def _function_site(node: fx.Node, targets: Sequence[str]) -> tuple[str, bool, str] | None:
    """(source, inplace, target) when ``node`` is a functional activation of ``targets``."""
    for t in targets:
        if node.op == "call_function" and node.target in _FUNCTIONS[t]:
            inplace = node.target is torch.relu_ or bool(
                node.kwargs.get("inplace", node.args[1:2] == (True,))
            )
            return _FUNCTIONS[t][node.target], inplace, t
        if node.op == "call_method" and node.target in _METHODS[t]:
            return _METHODS[t][str(node.target)], node.target == "relu_", t
    return None


def _free_name(parent: nn.Module, base: str, taken: set[tuple[int, str]]) -> str:
    name = base
    while hasattr(parent, name) or (id(parent), name) in taken:
        name += "_"
    taken.add((id(parent), name))
    return name


_Call = tuple[str, fx.Node, bool]  # (owner name, node, inplace)


class FoundSites:
    """Every ReLU call site of a model before selection, with what converting each one takes."""

    def __init__(self, module: nn.Module, targets: Sequence[str]) -> None:
        self.module, self.targets = module, tuple(targets)
        self.sites: list[Site] = []
        self.edits: list[Edit] = []
        self.holders: dict[str, Holder] = {}  # site (or nn.ReLU module) name -> where its QuantReLU goes
        self.owners: dict[str, TracedOwner] = {}
        self.not_traced: list[tuple[str, str, str]] = []
        self.leftovers = Leftovers()
        self._taken: set[tuple[int, str]] = set()  # attribute names given to new QuantReLUs
        locations = self._relu_modules()
        calls, functional = self._trace(locations)
        self._module_sites(calls)
        self._function_sites(functional)
        self._attribute_sites()
        if not self.sites:
            raise self.leftovers.no_relu_error(module, self.targets, self.not_traced)

    def _relu_modules(self) -> dict[tuple[int, str], str]:
        """Where each nn.ReLU sits: (parent, attribute) -> its first qualified name (a module may sit in several)."""
        locations: dict[tuple[int, str], str] = {}
        seen_like: set[int] = set()
        for parent_name, parent in self.module.named_modules(remove_duplicate=False):
            # module_slots, not named_children: a child held under two names is two places.
            for attr, child in module_slots(parent).items():
                if _module_target(child, self.targets) is not None and (id(parent), attr) not in locations:
                    name = qualified(parent_name, attr)
                    locations[(id(parent), attr)] = name
                    self.holders[name] = (parent, attr)
                elif isinstance(child, _RELU_LIKE_MODULES) and id(child) not in seen_like:
                    seen_like.add(id(child))
                    what = f"nn.{type(child).__name__}"
                    self.leftovers.note(f"{qualified(parent_name, attr)} ({what})", what)
        return locations

    def _trace(
        self, locations: dict[tuple[int, str], str]
    ) -> tuple[dict[str, list[_Call]], list[tuple[str, fx.Node, str, bool, str]]]:
        """Trace every module's own forward: the calls of each nn.ReLU, and the functional ReLUs."""
        calls: dict[str, list[_Call]] = {}  # nn.ReLU location -> its calls, in trace order
        functional: list[tuple[str, fx.Node, str, bool, str]] = []  # (owner, node, source, inplace, target)
        for owner_name, owner in self.module.named_modules():
            if not wants_trace(owner):
                continue
            graph, reason = trace_own_forward(owner)
            if graph is None:
                if _mentions_relu(owner):
                    self.not_traced.append((owner_name, type(owner).__qualname__, reason))
                continue
            self.owners[owner_name] = TracedOwner(owner, graph)
            for node in graph.nodes:
                if node.op == "call_module":
                    prefix, _, attr = str(node.target).rpartition(".")
                    parent = owner.get_submodule(prefix)
                    relu = module_slots(parent).get(attr)
                    if relu is not None and _module_target(relu, self.targets) is not None:
                        location = locations[(id(parent), attr)]
                        calls.setdefault(location, []).append((owner_name, node, bool(relu.inplace)))
                elif (site := _function_site(node, self.targets)) is not None:
                    functional.append((owner_name, node, *site))
                elif (like := _relu_like_call(node)) is not None:
                    self.leftovers.note(f"{like} in {owner_name or '<root>'}.forward", like)
        return calls, functional

    def _module_sites(self, calls: dict[str, list[_Call]]) -> None:
        """One site per nn.ReLU module, or one per call of a module called at several places."""
        for location, (parent, attr) in list(self.holders.items()):
            relu = module_slots(parent)[attr]
            assert relu is not None  # holders only lists ReLU modules so far
            target = _module_target(relu, self.targets) or "relu"
            source = f"nn.{type(relu).__name__}({'inplace=True' if relu.inplace else ''})"
            found = calls.get(location, [])
            if len(found) <= 1:
                site = Site(
                    location, "module", source, found[0][0] if found else None, location, target=target
                )
                self.sites.append(site)
                if found:
                    owner_name, node, inplace = found[0]
                    changes = inplace and read_after(node)
                    self.edits.append(
                        Edit(site.name, owner_name, node.name, str(node.target), inplace, changes)
                    )
                continue
            for k, (owner_name, node, inplace) in enumerate(found):
                new_attr = attr if k == 0 else _free_name(parent, f"{attr}_{k}", self._taken)
                name = qualified(location.rpartition(".")[0], new_attr)
                site = Site(name, "call", source, owner_name, location, (k + 1, len(found)), target)
                self.sites.append(site)
                node_target = qualified(str(node.target).rpartition(".")[0], new_attr)
                changes = k > 0 or (inplace and read_after(node))
                self.edits.append(Edit(name, owner_name, node.name, node_target, inplace, changes))
                self.holders.setdefault(name, (parent, new_attr))

    def _function_sites(self, functional: list[tuple[str, fx.Node, str, bool, str]]) -> None:
        """One site per functional ReLU call, a new QuantReLU ``relu_fx_<k>`` of the module that makes it."""
        counters: dict[str, int] = {}
        for owner_name, node, source, inplace, target in functional:
            owner = self.owners[owner_name].module
            k = counters.get(owner_name, 0)
            counters[owner_name] = k + 1
            attr = _free_name(owner, f"relu_fx_{k}", self._taken)
            site = Site(qualified(owner_name, attr), "function", source, owner_name, "", target=target)
            self.sites.append(site)
            self.edits.append(Edit(site.name, owner_name, node.name, attr, inplace, True))
            self.holders[site.name] = (owner, attr)

    def _attribute_sites(self) -> None:
        """PyTorch's Transformer layers keep ``activation="relu"`` as the plain function F.relu (an attribute,
        not a module, so no trace sees it): the layer's own QuantReLU takes its place."""
        for layer_name, layer in self.module.named_modules():
            if not isinstance(layer, TRANSFORMER_LAYERS) or "activation" in module_slots(layer):
                continue
            fn = layer.__dict__.get("activation")
            target = next((t for t in self.targets if fn in _FUNCTIONS[t]), None)
            if target is not None:
                source = f"{_FUNCTIONS[target][fn]} (activation of {type(layer).__name__})"
                name = qualified(layer_name, "activation")
                self.sites.append(Site(name, "attribute", source, layer_name, "", target=target))
                self.holders[name] = (layer, "activation")
            elif fn in _RELU_LIKE_FUNCTIONS:
                like = _RELU_LIKE_FUNCTIONS[fn]
                self.leftovers.note(f"{qualified(layer_name, 'activation')} ({like})", like)


def find_sites(module: object, targets: Sequence[str]) -> FoundSites:
    """Every ReLU call site of ``module`` for ``targets``; ValueError when it is not a model holding one."""
    if not isinstance(module, nn.Module):
        raise ValueError(f"`module` must be an nn.Module, got {type(module).__name__}")
    if _module_target(module, targets) is not None:
        raise ValueError(f"`module` is itself an {type(module).__name__}: convert the module that holds it")
    return FoundSites(module, targets)


def select_sites(
    sites: list[Site], include: Sequence[str] | None, exclude: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """Names of the sites matching ``include`` and no ``exclude`` by their name or, for shared calls, their
    module's name; and the ``include`` patterns that match nothing."""
    candidates = {s.name: [s.name] + ([s.origin] if s.kind == "call" else []) for s in sites}
    every = sorted({c for cs in candidates.values() for c in cs})
    included, _, unmatched = select_names(every, include, None)
    _, excluded, _ = select_names(every, None, exclude)
    inc, exc = set(included), set(excluded)
    chosen = [
        n for n, cs in candidates.items() if any(c in inc for c in cs) and not any(c in exc for c in cs)
    ]
    return chosen, unmatched
