"""What a weight conversion leaves in float, and why; which weights several layers share.

The plan names every float weight the conversion does not quantize (BCGD19 keeps normalisation layers and
biases in float; the others are named with the reason), so nothing is left unnamed.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from lightning_ste._compat import norm_layer_types, parameter_slots
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.quantizers.weight import WeightQuantizer
from lightning_ste.surgery.plan import qualified

__all__ = ["float_leftovers", "weight_users"]


def weight_users(module: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> [qualified names that hold it]`` for every parameter held in more than one place.

    A quantized layer's latent (``parametrizations.weight.original``) counts as its ``weight``.
    """
    users: dict[int, list[str]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, parametrize.ParametrizationList):
            continue
        for pname, p in parameter_slots(m).items():
            if p is not None:
                users.setdefault(id(p), []).append(qualified(name, pname))
        chains = getattr(m, "parametrizations", None)
        if isinstance(chains, nn.ModuleDict):
            for pname, chain in chains.items():
                latent = parameter_slots(chain).get("original")
                if latent is not None:
                    users.setdefault(id(latent), []).append(qualified(name, pname))
    return {k: sorted(set(v)) for k, v in users.items() if len(set(v)) > 1}


def float_leftovers(
    module: nn.Module, candidates: set[int], types: tuple[type[nn.Module], ...], quantized: set[int]
) -> tuple[list[tuple[str, str]], int, int]:
    """Float weights no layer type selects, with why: ``([(name, reason)], n_norm_layers, n_biases)``.

    ``candidates`` are the ids of the layers the plan considered, ``quantized`` the ids of the weights it
    quantizes (a parameter tied to one of those reads the float W, not q(W)).
    """
    norms_types = norm_layer_types()
    leftovers: list[tuple[str, str]] = []
    norms = biases = 0
    seen: set[int] = set()
    for name, m in module.named_modules():
        params = parameter_slots(m)
        if isinstance(m, parametrize.ParametrizationList) or id(m) in candidates:
            biases += sum(1 for k, p in params.items() if p is not None and "bias" in k)
            continue
        if isinstance(m, norms_types):
            norms += any(p is not None for p in params.values())
            continue
        if isinstance(m, (WeightQuantizer, QuantReLU)):
            continue
        for pname, p in params.items():
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
            leftovers.append((f"{qualified(name, pname)} ({cls})", why))
    return leftovers, norms, biases
