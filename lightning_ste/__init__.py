"""lightning_ste: train low-bit networks in Lightning with straight-through estimators and BCGD.

Public API (imported lazily so ``import lightning_ste`` stays cheap):
``QuantizeActivations``, ``BlendedQuantWeights``, ``QuantReLU``, ``WeightQuantizer``,
``quantize_activations_``, ``quantize_weights_``, ``load_from_checkpoint``, ``summary``.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_ste import functional
from lightning_ste.quantizers import ste
from lightning_ste.modules import QuantReLU, WeightQuantizer

__version__ = "0.1.0"

_LAZY = {
    "QuantizeActivations": "lightning_ste.callbacks.activations",
    "BlendedQuantWeights": "lightning_ste.callbacks.weights",
    "quantize_activations_": "lightning_ste.convert",
    "quantize_weights_": "lightning_ste.weights",
    "load_from_checkpoint": "lightning_ste.recipe",
    "summary": "lightning_ste.model_summary",
    "QuantSummary": "lightning_ste.model_summary",
    "QuantTelemetry": "lightning_ste.telemetry",
    "export": "lightning_ste.export",
}

__all__ = ["QuantReLU", "WeightQuantizer", "functional", "ste", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'lightning_ste' has no attribute {name!r}")
