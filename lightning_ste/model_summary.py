# moved; shim removed at integration
from lightning_ste.bit_summary import LayerSummary, QuantModelSummary, summary
from lightning_ste.callbacks.summary import QuantSummary

__all__ = ["LayerSummary", "QuantModelSummary", "QuantSummary", "summary"]
