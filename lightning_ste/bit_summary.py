"""Bit-aware model summary: each layer's weight and activation bits, model size at the real bit-widths.

Size accounting (the storage an inference copy needs): every floating-point parameter and persistent
floating-point buffer (BatchNorm running statistics included, integer counters excluded) at its dtype's
width, except quantized weights (:func:`lightning_ste.inspect.quantized_layers`), which take ``bits`` per
element plus one scale per tensor (or per output channel) at the weight's dtype width. Ternary weights count
2 bits (their packed width, BCGD19; docs/math.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_ste import _compat
from lightning_ste.inspect import QuantizedLayer, quantized_layers
from lightning_ste.quantizers.activation import QuantReLU
from lightning_ste.quantizers.weight import WeightQuantizer

__all__ = ["LayerSummary", "QuantModelSummary", "parametrization_chains", "summary"]

FP32_BITS = 32


def scale_count(weight: Tensor, quantizer: WeightQuantizer) -> int:
    """Number of scales q(W) carries: one per tensor, or one per output channel (``per_channel``).

    A ConvTranspose weight is laid out ``[in, out/groups, *k]``: its output channels are ``shape[1] * groups``.
    """
    if not (quantizer.per_channel and weight.dim() > 1):
        return 1
    groups = getattr(quantizer, "groups", None)  # TransposedWeightQuantizer
    return weight.shape[1] * groups if groups is not None else weight.shape[0]


def _dtype_bits(t: Tensor) -> int:
    return torch.finfo(t.dtype).bits


@dataclass(frozen=True)
class LayerSummary:
    """One row: a module holding tensors of its own, or an activation quantizer."""

    name: str
    type: str
    params: int
    weight_bits: int | None  # None: no weight; 32 (the dtype width) for a float weight
    weight_quantized: bool
    quantized_params: int  # elements of the quantized weight (0 for float layers)
    activation_bits: int | None  # bits of a QuantReLU, None for other layers
    fp32_bits: int
    quantized_bits: int


@dataclass(frozen=True)
class QuantModelSummary:
    """Per-layer bits and the model size at the real bit-widths against fp32 (``str()`` gives the table)."""

    layers: list[LayerSummary] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def quantized_params(self) -> int:
        return sum(r.quantized_params for r in self.layers)

    @property
    def fp32_bytes(self) -> float:
        """Size of the same tensors stored as fp32."""
        return sum(r.fp32_bits for r in self.layers) / 8

    @property
    def quantized_bytes(self) -> float:
        """Size at the real bit-widths (quantized weights packed, scales and everything else float)."""
        return sum(r.quantized_bits for r in self.layers) / 8

    @property
    def compression(self) -> float:
        """fp32 size / quantized size."""
        return self.fp32_bytes / self.quantized_bytes if self.quantized_bytes else 1.0

    def __str__(self) -> str:
        header = ("", "Name", "Type", "Params", "W bits", "A bits", "fp32 size", "Quant size")
        rows = [
            (
                str(i),
                r.name or "(root)",
                r.type,
                _human_count(r.params),
                "-" if r.weight_bits is None else str(r.weight_bits),
                "-" if r.activation_bits is None else str(r.activation_bits),
                _human_bytes(r.fp32_bits / 8),
                _human_bytes(r.quantized_bits / 8),
            )
            for i, r in enumerate(self.layers)
        ]
        widths = [max(len(row[c]) for row in [header, *rows]) for c in range(len(header))]
        lines = [" | ".join(h.ljust(w) for h, w in zip(header, widths))]
        lines.append("-" * len(lines[0]))
        lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
        lines.append("-" * len(lines[0]))
        n_act = sum(r.activation_bits is not None for r in self.layers)
        n_weights = sum(r.weight_quantized for r in self.layers)
        lines += [
            f"{self.total_params:<12,} Total params",
            f"{self.quantized_params:<12,} Quantized weights ({n_weights} layers)",
            f"{n_act:<12} Activation quantizers",
            f"{self.fp32_bytes / 1e6:<12.3f} Model size at fp32 (MB)",
            f"{self.quantized_bytes / 1e6:<12.3f} Model size at the real bit-widths (MB)",
            f"{self.compression:<12.2f} Compression (fp32 / quantized)",
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def _human_count(n: int) -> str:
    for unit, div in (("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return str(n)


def _human_bytes(n: float) -> str:
    for unit, div in (("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:g} B"


def parametrization_chains(module: nn.Module) -> dict[str, parametrize.ParametrizationList]:
    """``module.parametrizations`` (tensor name -> its chain), empty for a module without any."""
    if not parametrize.is_parametrized(module):
        return {}
    chains = module.parametrizations
    if not isinstance(chains, nn.ModuleDict):
        return {}
    return {
        name: chain for name, chain in chains.items() if isinstance(chain, parametrize.ParametrizationList)
    }


def _layer_row(
    name: str, module: nn.Module, quantized: QuantizedLayer | None, seen: set[int]
) -> LayerSummary | None:
    """One row; tensors in ``seen`` (a weight tied to an earlier layer) are not counted again."""
    params = fp32 = quant = quantized_params = 0
    weight_bits: int | None = None
    tied = quantized is not None and id(quantized.latent) in seen
    if quantized is not None:
        weight_bits = quantized.quantizer.bits
    if quantized is not None and not tied:
        w, quantizer = quantized.latent, quantized.quantizer
        seen.add(id(w))
        params += w.numel()
        quantized_params = w.numel()
        fp32 += FP32_BITS * w.numel()
        # Ternary codes take 2 bits, b-bit codes b bits; the scales stay at the weight's width.
        quant += quantizer.bits * w.numel() + _dtype_bits(w) * scale_count(w, quantizer)
    # remove_duplicate=False: the module's own parameter slots as registered (one tensor under two names twice).
    own = [
        (pname, p)
        for pname, p in module.named_parameters(recurse=False, remove_duplicate=False)
        if id(p) not in seen
    ]
    seen.update(id(p) for _, p in own)
    for pname, p in own:
        params += p.numel()
        if pname == "weight":
            weight_bits = _dtype_bits(p)
    tensors: list[Tensor] = [p for _, p in own]
    # Latent tensors of other parametrizations (weight norm, ...) are stored in float.
    for tname, chain in parametrization_chains(module).items():
        if tname == "weight" and quantized is not None:
            continue
        original = getattr(chain, "original", None)
        originals = [original] if isinstance(original, Tensor) else list(chain.parameters(recurse=False))
        params += sum(o.numel() for o in originals)
        tensors += originals
        if tname == "weight":
            weight_bits = _dtype_bits(originals[0])
    non_persistent = _compat.non_persistent_buffers(module)
    tensors += [
        b
        for bname, b in module.named_buffers(recurse=False)
        if b.is_floating_point() and bname not in non_persistent
    ]
    for t in tensors:
        if t.is_floating_point():
            fp32 += FP32_BITS * t.numel()
            quant += _dtype_bits(t) * t.numel()
    activation = module if isinstance(module, QuantReLU) else None
    if not (activation is not None or fp32 or tied):
        return None
    return LayerSummary(
        name=name,
        # A parametrized layer's class is the generated ``Parametrized<Layer>``: show the layer's own class.
        type=(type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)).__name__,
        params=params,
        weight_bits=weight_bits,
        weight_quantized=quantized is not None,
        quantized_params=quantized_params,
        activation_bits=activation.bits if activation is not None else None,
        fp32_bits=fp32,
        quantized_bits=quant,
    )


def summary(model: nn.Module) -> QuantModelSummary:
    """Each layer with its weight and activation bits, and the model size at the real bit-widths vs fp32.

    A weight parametrized by :class:`~lightning_ste.WeightQuantizer` counts ``bits`` per element plus its
    scale(s) (BCGD19: 1-bit sign, ternary 2-bit, b-bit codes); everything else counts at its float width.
    A weight shared by several layers (tied) is counted once, at the first layer that holds it.
    ``str(summary(model))`` is a ``ModelSummary``-style table.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
    quantized = {id(q.layer): q for q in quantized_layers(model)}
    rows = []
    seen: set[int] = set()  # a tied weight is stored, and counted, once
    for name, module in model.named_modules():
        # The parametrization containers are accounted for by the layer that owns them.
        if "parametrizations" in name.split("."):
            continue
        row = _layer_row(name, module, quantized.get(id(module)), seen)
        if row is not None:
            rows.append(row)
    return QuantModelSummary(rows)
