"""Moved to :mod:`lightning_ste.callbacks.quantize_activations`."""

from lightning_ste.callbacks.quantize_activations import (
    QuantizeActivations,
)  # moved; shim removed at integration

__all__ = ["QuantizeActivations"]
