"""Moved to :mod:`lightning_ste.callbacks.blended_quant_weights`."""

from lightning_ste.callbacks.blended_quant_weights import BlendedQuantWeights  # moved; shim removed at integration

__all__ = ["BlendedQuantWeights"]
