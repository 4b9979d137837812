"""Moved: the weight conversion is :mod:`lightning_ste.surgery.weight_params`."""

# moved; shim removed at integration
from lightning_ste.inspect import quantized_layers
from lightning_ste.quantizers.transposed import TransposedWeightQuantizer
from lightning_ste.surgery.lazy import lazy_modules, materialize_lazy_
from lightning_ste.surgery.weight_params import apply_recipe, plan_weights, quantize_weights_

__all__ = [
    "TransposedWeightQuantizer",
    "apply_recipe",
    "lazy_modules",
    "materialize_lazy_",
    "plan_weights",
    "quantize_weights_",
    "quantized_layers",
]
