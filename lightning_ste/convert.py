"""Moved to :mod:`lightning_ste.surgery.activation_plan`."""

from lightning_ste.surgery.activation_plan import (
    apply_recipe,
    quantize_activations_,
)  # moved; shim removed at integration

__all__ = ["apply_recipe", "quantize_activations_"]
