"""Moved to :mod:`lightning_ste.callbacks.blended_quant_weights`."""

# moved; shim removed at integration
from lightning_ste.callbacks.blended_quant_weights import BlendedQuantWeights

__all__ = ["BlendedQuantWeights"]
