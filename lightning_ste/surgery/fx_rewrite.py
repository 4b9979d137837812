"""Trace one module's own ``forward`` with :mod:`torch.fx` and give it back a rewritten one.

Each module is traced on its own, every submodule a leaf, so a functional ReLU is found (and rewritten) in the
smallest module whose ``forward`` holds it. Tracing never changes the model: every attribute a forward assigns
while traced is put back, and such a forward is not rewritten (torch.fx records no attribute assignment).
A rewritten module keeps its class, attributes and hooks: only ``forward`` is replaced, on the instance, by
the code generated from the edited graph (:class:`TracedForward`, picklable and deep-copyable).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize

from lightning_ste._compat import (
    buffer_slots,
    compiled_forward_context,
    format_import_block,
    forward_from_source,
    module_slots,
    parameter_slots,
)
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.surgery.plan import Undo

__all__ = [
    "ABSENT",
    "Edit",
    "NoFastPathForward",
    "TracedForward",
    "TracedOwner",
    "compile_forward",
    "disable_fast_path",
    "edited_graph",
    "is_lightning_compiled_forward",
    "read_after",
    "restorer",
    "set_forward",
    "trace_own_forward",
    "wants_trace",
]

ABSENT = object()  # "there was nothing here" for :func:`restorer`


@dataclass
class Edit:
    """One change to a traced graph: the node of a site, the submodule to call instead, in-place semantics."""

    site: str  # the name of the site's QuantReLU
    owner: str  # the module whose forward holds the node ("" = root)
    node_name: str
    target: str  # call_module target relative to the owner
    inplace: bool
    changes: bool  # whether the owner's forward must be rewritten for this edit


@dataclass
class TracedOwner:
    """A module whose own forward was traced, and the edits its graph gets."""

    module: nn.Module
    graph: fx.Graph
    edits: list[Edit] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ tracing


class _OwnForwardTracer(fx.Tracer):
    """Traces one module's own forward: every submodule (QuantReLU, nn.ReLU, parametrized, ...) is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self.root


def wants_trace(m: nn.Module) -> bool:
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


_Snapshot = list[tuple[dict[str, Any], dict[str, Any]]]


def _snapshot(m: nn.Module) -> _Snapshot:
    """Shallow copies of the attribute dicts of ``m`` and its submodules (tracing may assign to any of them)."""
    return [
        (d, dict(d))
        for sub in m.modules()
        for d in (sub.__dict__, parameter_slots(sub), buffer_slots(sub), module_slots(sub))
    ]


def _restore(snapshot: _Snapshot) -> list[str]:
    """Put every dict of :func:`_snapshot` back as it was; return the names that tracing had changed."""
    changed = []
    for live, saved in snapshot:
        keys = set(live) | set(saved)
        diff = [k for k in keys if k not in live or k not in saved or live[k] is not saved[k]]
        if diff:
            changed += diff
            live.clear()
            live.update(saved)
    return sorted(set(changed))


def _graph_key(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def trace_own_forward(m: nn.Module) -> tuple[fx.Graph | None, str]:
    """fx graph of ``m``'s own forward, or (None, reason) when it cannot be traced faithfully.

    Tracing never changes the model: every attribute dict of ``m`` and its submodules is restored after it.
    A forward that assigns attributes (``self.mask = ...``) is not traced, since the fx graph would drop the
    assignment; nor one that depends on ``self.training`` (it is traced in both modes and compared).
    """
    existing = m.__dict__.get("forward")
    if isinstance(existing, TracedForward):
        if existing.graph is None:
            return None, "its forward was rewritten before and restored from a pickle (no graph kept)"
        return copy.deepcopy(existing.graph), ""
    if existing is not None and not is_lightning_compiled_forward(m):
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


def is_lightning_compiled_forward(m: nn.Module) -> bool:
    """Lightning's ``from_compiled`` wraps the class forward of a compiled LightningModule on the instance."""
    ctx = compiled_forward_context(m)
    original = ctx.get("original_forward") if ctx is not None else None
    return getattr(original, "__self__", None) is m and getattr(original, "__func__", None) is type(m).forward


def read_after(node: fx.Node) -> bool:
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


# ---------------------------------------------------------------------------------------------- rewriting


class TracedForward:
    """A module's forward generated from its edited fx graph, bound to the module; picklable and copyable.

    Set as ``module.forward`` on the instance, so the module keeps its class, attributes and hooks.
    """

    def __init__(self, owner: nn.Module, src: str, import_block: str, graph: fx.Graph | None = None) -> None:
        self.owner, self.src, self.import_block, self.graph = owner, src, import_block, graph
        self._fn = forward_from_source(import_block + "\n" + src)
        parameters = list(inspect.signature(self._fn).parameters.values())[1:]
        self.__signature__ = inspect.Signature(parameters)
        # Lightning's `is_overridden` reads `__wrapped__.__code__`; `__signature__` keeps `inspect` on the
        # bound signature (without `self`).
        self.__wrapped__ = self._fn
        self.__name__ = self.__qualname__ = "forward"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(self.owner, *args, **kwargs)

    def __reduce__(self) -> tuple[type[TracedForward], tuple[nn.Module, str, str]]:
        return (TracedForward, (self.owner, self.src, self.import_block))

    def __deepcopy__(self, memo: dict[int, Any]) -> TracedForward:
        owner = copy.deepcopy(self.owner, memo)
        if id(self) in memo:  # reached again through the owner's __dict__
            return memo[id(self)]
        clone = TracedForward(owner, self.src, self.import_block, copy.deepcopy(self.graph))
        memo[id(self)] = clone
        return clone

    def __repr__(self) -> str:
        return f"<lightning_ste traced forward of {type(self.owner).__qualname__}>"


class NoFastPathForward:
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


def edited_graph(owner: TracedOwner) -> fx.Graph:
    """A copy of the owner's graph where each edited node calls its QuantReLU submodule instead."""
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
    with ``from __future__ import annotations``) are assigned, as newer torch does; older torch's import
    block formatter fails on them."""
    strings = sorted(f"{name} = {obj!r}" for name, obj in globals_.items() if isinstance(obj, str))
    others = {name: obj for name, obj in globals_.items() if not isinstance(obj, str)}
    return "\n".join([*strings, format_import_block(others)])


def compile_forward(owner: TracedOwner) -> TracedForward:
    """The owner's new forward, generated from its edited graph (everything that can fail happens here)."""
    graph = edited_graph(owner)
    code = graph.python_code(root_module="self")
    return TracedForward(owner.module, code.src, _import_block(code.globals), graph)


# --------------------------------------------------------------------------------------------- installing


def restorer(obj: Any, name: str, old: Any) -> Callable[[], None]:
    """The function that puts back ``obj``'s ``name`` (a child module, an attribute or a dict entry)."""

    def restore() -> None:
        if isinstance(obj, dict):
            obj[name] = old
        elif old is ABSENT and name in module_slots(obj):
            delattr(obj, name)
        elif old is ABSENT:
            obj.__dict__.pop(name, None)
        else:
            setattr(obj, name, old)

    return restore


def set_forward(module: nn.Module, forward: Callable[..., Any], undo: Undo) -> None:
    """Make ``forward`` the forward of this instance; a Lightning-compiled module is compiled again around it."""
    undo(restorer(module, "forward", module.__dict__.get("forward", ABSENT)))
    ctx = compiled_forward_context(module)
    if "forward" in module.__dict__ and ctx is not None and is_lightning_compiled_forward(module):
        undo(restorer(ctx, "original_forward", ctx["original_forward"]))
        ctx["original_forward"] = forward
        forward = ctx["dynamo_ctx"](forward)
    module.forward = forward


def disable_fast_path(layer: nn.TransformerEncoderLayer | nn.TransformerDecoderLayer, undo: Undo) -> None:
    """Run a Transformer layer without PyTorch's fused fast paths.

    They (eval, no grad) would compute a float ReLU, bypassing the QuantReLU, and fused attention rounds
    differently: both off, so train and eval run the same Python code.
    """
    if isinstance(layer, nn.TransformerEncoderLayer):
        undo(restorer(layer.__dict__, "activation_relu_or_gelu", layer.activation_relu_or_gelu))
        layer.activation_relu_or_gelu = 0
    if not isinstance(layer.__dict__.get("forward"), NoFastPathForward):
        undo(restorer(layer, "forward", layer.__dict__.get("forward", ABSENT)))
        layer.forward = NoFastPathForward(layer)  # type: ignore[method-assign]
