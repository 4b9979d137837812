from lightning_ste.callbacks.telemetry import QuantTelemetry  # moved; shim removed at integration
from lightning_ste.occupancy import level_counts  # moved; shim removed at integration

__all__ = ["QuantTelemetry", "level_counts"]
