"""Lazy modules and the probe forward: one eval-mode, no-grad forward on an example input.

``nn.LazyLinear``, ``LazyConv2d``, ... get their weight shapes from their first forward; a conversion needs
those shapes, so :func:`materialize_lazy_` runs that forward first. :func:`execution_order` records which
layers a forward calls first and last (``keep_first_last``, BCGD19). The probe changes no BatchNorm
statistic and calibrates no activation: it runs in eval mode and restores the training flags after.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from lightning_ste._compat import buffer_slots, parameter_slots

__all__ = ["execution_order", "lazy_modules", "materialize_lazy_"]


def lazy_modules(module: nn.Module) -> list[str]:
    """Names of the modules holding an uninitialized (lazy) parameter or buffer."""
    return [
        name or "<root>"
        for name, m in module.named_modules()
        if any(is_lazy(t) for t in [*parameter_slots(m).values(), *buffer_slots(m).values()] if t is not None)
    ]


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

    def hook_for(name: str) -> Callable[[nn.Module, Any], None]:
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
