"""lightning_ste: train low-bit networks in Lightning with straight-through estimators and BCGD.

Public API (imported lazily so ``import lightning_ste`` stays cheap):
the callbacks ``QuantizeActivations``, ``BlendedQuantWeights``, ``QuantSummary``, ``QuantTelemetry``; the
configs ``ActivationQuantConfig``, ``WeightQuantConfig``; the Trainer-free ``quantize_activations_``,
``quantize_weights_`` (and their ``plan_*``), ``remove_quantization_``, ``load_from_checkpoint``, ``summary``,
``quantized_layers``; the modules ``QuantReLU``, ``WeightQuantizer``; ``functional``, ``ste``, ``export``.
"""

from __future__ import annotations

import importlib
from typing import Any

from lightning_ste import functional
from lightning_ste.config import ActivationQuantConfig, WeightQuantConfig
from lightning_ste.quantizers import ste
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.quantizers.weight import WeightQuantizer

__version__ = "0.1.0"

_LAZY = {
    "QuantizeActivations": "lightning_ste.callbacks.quantize_activations",
    "BlendedQuantWeights": "lightning_ste.callbacks.blended_quant_weights",
    "QuantSummary": "lightning_ste.callbacks.summary",
    "QuantTelemetry": "lightning_ste.callbacks.telemetry",
    "plan_activations": "lightning_ste.surgery.activation_plan",
    "quantize_activations_": "lightning_ste.surgery.activation_plan",
    "plan_weights": "lightning_ste.surgery.weight_params",
    "quantize_weights_": "lightning_ste.surgery.weight_params",
    "remove_quantization_": "lightning_ste.surgery.weight_params",
    "quantized_layers": "lightning_ste.inspect",
    "load_from_checkpoint": "lightning_ste.recipe",
    "summary": "lightning_ste.bit_summary",
    "export": "lightning_ste.export",
}

__all__ = [
    "ActivationQuantConfig",
    "QuantReLU",
    "WeightQuantConfig",
    "WeightQuantizer",
    "functional",
    "ste",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        return module if module.__name__.endswith("." + name) else getattr(module, name)
    raise AttributeError(f"module 'lightning_ste' has no attribute {name!r}")
