"""The one definition of "the quantized layers" and "the activation sites" of a model.

A layer's weight is quantized when its whole ``weight`` parametrization is one
:class:`~lightning_ste.WeightQuantizer`: ``layer.weight`` is then exactly q(W) of the float latent W
(``layer.parametrizations.weight.original``), the quantity BCGD blends (BCGD19, docs/math.md), the summary
counts at ``bits`` and export packs. A chain with anything else in it is not q(W) and counts as float.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.quantizers.weight import WeightQuantizer

__all__ = ["QuantizedLayer", "activation_sites", "quantized_layers", "weight_chain", "weight_quantizer"]


class QuantizedLayer(NamedTuple):
    """One layer whose weight is q(W): its name, the layer, the float latent W and the quantizer q."""

    name: str
    layer: nn.Module
    latent: Tensor
    quantizer: WeightQuantizer


def weight_chain(layer: nn.Module) -> parametrize.ParametrizationList | None:
    """``layer.parametrizations.weight``, or None when ``weight`` is not parametrized."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    chain = layer.parametrizations["weight"]  # type: ignore[index]
    return chain if isinstance(chain, parametrize.ParametrizationList) else None


def weight_quantizer(layer: nn.Module) -> WeightQuantizer | None:
    """The :class:`WeightQuantizer` that is ``layer.weight``'s whole parametrization, or None."""
    chain = weight_chain(layer)
    # The blend W <- (1-ρ)W + ρ q(W) and the packed codes are only defined when q is the whole chain.
    if chain is not None and len(chain) == 1 and isinstance(chain[0], WeightQuantizer):
        return chain[0]
    return None


def quantized_layers(model: nn.Module) -> Iterator[QuantizedLayer]:
    """Every layer whose weight is q(W), in ``named_modules`` order (a layer held twice once)."""
    for name, layer in model.named_modules():
        quantizer = weight_quantizer(layer)
        if quantizer is not None:
            # While torch.nn.utils.prune holds the latent, ``original`` is the masked W ⊙ M (a plain Tensor).
            yield QuantizedLayer(name, layer, weight_chain(layer).original, quantizer)  # type: ignore[union-attr]


def activation_sites(model: nn.Module) -> Iterator[tuple[str, QuantReLU]]:
    """Every :class:`QuantReLU` of ``model`` with its name, in ``named_modules`` order (a shared one once)."""
    for name, module in model.named_modules():
        if isinstance(module, QuantReLU):
            yield name, module
