"""Every use of a private torch or Lightning internal, one small function each.

Nothing else in the package reads or writes an underscored attribute of torch or Lightning. When a release
renames one of these, ``tests/test_compat.py`` fails on the function that broke, not somewhere deep inside a
conversion. Where a public route exists, the package uses it instead of this module.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "AroundSubcommand",
    "apply_batch_transfer",
    "attached_trainer",
    "batches_that_stepped",
    "compiled_forward_context",
    "cpp_build_directory",
    "drop_parametrized_class",
    "foreach_add_",
    "foreach_div_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_norm",
    "foreach_sign",
    "format_import_block",
    "instantiate_cli_trainer",
    "parser_option_names",
    "forward_from_source",
    "module_slots",
    "non_persistent_buffers",
    "norm_layer_types",
    "parameter_slots",
    "buffer_slots",
    "callback_state_key",
    "pruning_entries",
    "pruning_original_layers",
    "pruning_parameter_names",
    "scaler_found_inf",
    "set_pruning_entries",
    "stage_data_loader",
    "storage_use_count",
    "tensor_version",
]


# ----------------------------------------------------------------------------------------- nn.Module


def parameter_slots(module: nn.Module) -> dict[str, nn.Parameter | None]:
    """The module's own parameter dict, live (``None`` entries included, order kept; writes take effect)."""
    return module._parameters


def buffer_slots(module: nn.Module) -> dict[str, Tensor | None]:
    """The module's own buffer dict, live."""
    return module._buffers


def module_slots(module: nn.Module) -> dict[str, nn.Module | None]:
    """The module's own child dict, live: unlike ``named_children`` it lists a child held twice twice."""
    return module._modules


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """Names of the module's own buffers registered with ``persistent=False``."""
    return set(module._non_persistent_buffers_set)


def norm_layer_types() -> tuple[type[nn.Module], ...]:
    """The common base of BatchNorm and InstanceNorm, plus the public norm layers."""
    return (
        nn.modules.batchnorm._NormBase,
        nn.LayerNorm,
        nn.GroupNorm,
        nn.LocalResponseNorm,
        nn.RMSNorm,
    )


def drop_parametrized_class(module: nn.Module) -> None:
    """Give a parametrized module back its own class, without deleting the properties of the shared one.

    ``parametrize.register_parametrization`` swaps the instance's class for a generated subclass; its
    ``remove_parametrizations`` deletes properties from that subclass, which a deep copy shares with the
    original. Export works on copies, so the class is swapped back instead.
    """
    if "parametrizations" in module._modules:
        del module._modules["parametrizations"]
        module.__class__ = module.__class__.__bases__[0]


# -------------------------------------------------------------------------------------------- tensors


def tensor_version(t: Tensor) -> int:
    """The tensor's in-place version counter (bumped by every in-place op on it or a view of it)."""
    return t._version


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def storage_use_count(t: Tensor) -> int | None:
    """How many references the tensor's storage has (None when this torch does not say)."""
    if _use_count is None:
        return None
    return int(_use_count(t.untyped_storage()._cdata))


def foreach_sign(ts: Sequence[Tensor]) -> list[Tensor]:
    return list(torch._foreach_sign(list(ts)))


def foreach_mul(ts: Sequence[Tensor], other: Sequence[Tensor] | float | Tensor) -> list[Tensor]:
    return list(torch._foreach_mul(list(ts), other))  # type: ignore[arg-type]


def foreach_mul_(ts: Sequence[Tensor], other: Sequence[Tensor] | float | Tensor) -> None:
    torch._foreach_mul_(list(ts), other)  # type: ignore[arg-type]


def foreach_add_(ts: Sequence[Tensor], other: Sequence[Tensor]) -> None:
    torch._foreach_add_(list(ts), list(other))


def foreach_div_(ts: Sequence[Tensor], other: Sequence[float] | Sequence[Tensor]) -> None:
    torch._foreach_div_(list(ts), list(other))  # type: ignore[arg-type]


def foreach_norm(ts: Sequence[Tensor], ord: float = 2) -> list[Tensor]:
    return list(torch._foreach_norm(list(ts), ord))


# ------------------------------------------------------------------------------------------------ fx


def forward_from_source(src: str) -> Callable[..., Any]:
    """Compile fx-generated ``forward`` source the way ``GraphModule`` does (linecache-backed, so tracebacks
    and ``inspect.getsource`` show it)."""
    from torch.fx.graph_module import _forward_from_src

    return _forward_from_src(src, {})


def format_import_block(globals_: dict[str, Any]) -> str:
    """The import lines fx-generated code needs for its globals."""
    from torch.fx.graph_module import _format_import_block
    from torch.package import sys_importer

    return _format_import_block(globals_, sys_importer)


def cpp_build_directory(name: str) -> str:
    """Where ``torch.utils.cpp_extension.load`` builds ``name`` (honours ``TORCH_EXTENSIONS_DIR``)."""
    from torch.utils import cpp_extension

    return cpp_extension._get_build_directory(name, False)


# ------------------------------------------------------------------------------------------ Lightning


def compiled_forward_context(module: nn.Module) -> dict[str, Any] | None:
    """The context Lightning's ``from_compiled`` keeps on a compiled LightningModule (None otherwise)."""
    ctx = getattr(module, "_compiler_ctx", None)
    return ctx if isinstance(ctx, dict) else None


def attached_trainer(module: nn.Module) -> Any:
    """The Trainer a LightningModule is attached to, or None (``module.trainer`` raises when there is none)."""
    return getattr(module, "_trainer", None)


def apply_batch_transfer(pl_module: Any, batch: Any) -> Any:
    """``batch`` moved and transformed as the LightningModule will see it (its transfer hooks included)."""
    return pl_module._apply_batch_transfer_handler(batch)


def stage_data_loader(trainer: Any, loop_name: str) -> Any:
    """The dataloader(s) the Trainer was given for a stage (``fit_loop``, ``validate_loop``, ...), or None."""
    loop = getattr(trainer, loop_name, None)
    source = getattr(loop, "_data_source", None)
    if source is not None and source.instance is not None and source.is_defined():
        return source.dataloader()
    return None


def batches_that_stepped(trainer: Any) -> int:
    """The step Lightning's own ``self.log`` uses for loggers."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def callback_state_key(callback: Any, **arguments: Any) -> str:
    """The key Lightning files a callback's state under (``Callback._generate_state_key``)."""
    return str(callback._generate_state_key(**arguments))


def scaler_found_inf(scaler: object, optimizer: Any) -> Tensor | None:
    """The GradScaler's own "gradients not finite" flag for ``optimizer`` (float 0/1 on the device), as
    ``unscale_`` found it; None when ``unscale_`` has not run for this optimizer in this step.

    ``scaler.step`` skips the step exactly when this is nonzero, so the blend can follow it without
    another pass over every gradient.
    """
    states = getattr(scaler, "_per_optimizer_states", None)
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    per_device = state.get("found_inf_per_device") if isinstance(state, dict) else None
    if not per_device:
        return None
    flags = list(per_device.values())
    if len(flags) == 1:
        return flags[0]
    return torch.stack([f.to(flags[0].device) for f in flags]).sum()


def pruning_entries(callback: Any) -> list[tuple[nn.Module, str]]:
    """ModelPruning's (module, parameter name) pairs, as it will prune them."""
    return list(callback._parameters_to_prune)


def set_pruning_entries(callback: Any, entries: list[tuple[nn.Module, str]]) -> None:
    callback._parameters_to_prune = entries


def pruning_parameter_names(callback: Any) -> list[str]:
    return list(callback._parameter_names)


def pruning_original_layers(callback: Any) -> dict[int, Any] | None:
    """ModelPruning's lottery-ticket copies of the original layers, keyed by ``id`` (None when not kept)."""
    return callback._original_layers


def instantiate_cli_trainer(cli: Any, config: dict[str, Any], callbacks: list[Any]) -> Any:
    """LightningCLI's step that adds the config's, the defaults' and the save-config callbacks to ``callbacks``
    and builds the Trainer (its public ``instantiate_trainer`` would also hand over absent sections' None)."""
    return cli._instantiate_trainer(config, callbacks)


class AroundSubcommand:
    """A LightningCLI mixin: :meth:`around_subcommand` wraps the whole run of ``fit``/``validate``/...

    LightningCLI runs a subcommand (``before_<sub>``, ``trainer.<sub>``, ``after_<sub>``) in its private
    ``_run_subcommand``; no public hook spans the run.
    """

    def around_subcommand(self, subcommand: str, run: Callable[[], None]) -> None:
        run()

    def _run_subcommand(self, subcommand: str) -> None:
        parent = super()._run_subcommand  # type: ignore[misc]
        self.around_subcommand(subcommand, lambda: parent(subcommand))


def parser_option_names(parser: Any) -> set[str]:
    """Every ``--option`` of an argparse/jsonargparse parser and of its subcommands, without the dashes."""
    keys: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        keys.update(o[2:] for o in getattr(p, "_option_string_actions", {}) if o.startswith("--"))
        action = getattr(p, "_subcommands_action", None)
        if action is not None:
            stack.extend(action.choices.values())
    return keys
