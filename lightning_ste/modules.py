"""Moved to :mod:`lightning_ste.quantizers.activation` and :mod:`lightning_ste.quantizers.weight`."""

from lightning_ste.quantizers.activation import ALPHA_MODES, QuantReLU  # moved; shim removed at integration
from lightning_ste.quantizers.weight import (  # moved; shim removed at integration
    WeightQuantizer,
    prepare_weights_,
)

__all__ = ["ALPHA_MODES", "QuantReLU", "WeightQuantizer", "prepare_weights_"]
