"""The functional API (like ``torch.nn.functional``): the pure functions of docs/math.md §1–2 and their constants.

Quantized ReLU (:mod:`lightning_ste.quantizers.activation`), weight quantizers
(:mod:`lightning_ste.quantizers.weight`), the half-Gaussian resolution (:mod:`lightning_ste.quantizers.resolution`)
and the validators and constants of :mod:`lightning_ste.config`. No module state, no Lightning.
"""

from __future__ import annotations

from lightning_ste.config import (
    ALPHA_FLOOR,
    ALPHA_GRADS,
    BINARY_SCALES,
    MAX_BITS,
    MIN_BITS,
    ROUNDINGS,
    TERNARY_SCALES,
    check_bits,
    check_choice,
    check_quantized_relu_args,
)
from lightning_ste.quantizers.activation import quantized_relu, quantized_relu_unchecked
from lightning_ste.quantizers.resolution import half_gaussian_resolution
from lightning_ste.quantizers.weight import (
    binary_mean_scales,
    binary_weight_multi,
    one_pass_binary,
    one_pass_binary_weight,
    quantize_weight,
    straight_through,
    weight_codes,
)

__all__ = [
    "ALPHA_FLOOR",
    "ALPHA_GRADS",
    "BINARY_SCALES",
    "MAX_BITS",
    "MIN_BITS",
    "ROUNDINGS",
    "TERNARY_SCALES",
    "binary_mean_scales",
    "binary_weight_multi",
    "check_bits",
    "check_choice",
    "check_quantized_relu_args",
    "half_gaussian_resolution",
    "one_pass_binary",
    "one_pass_binary_weight",
    "quantize_weight",
    "quantized_relu",
    "quantized_relu_unchecked",
    "straight_through",
    "weight_codes",
]
