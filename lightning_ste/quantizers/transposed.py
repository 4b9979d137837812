"""q(W) of a ConvTranspose weight, scaled per *output* channel like every other layer (BCGD19, docs/math.md).

A ConvTranspose weight is laid out ``[in, out/groups, *k]``; q is computed on it viewed ``[out, in/groups, *k]``
and laid back, so ``per_channel`` means the same for every layer type.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

from lightning_ste.quantizers.weight import WeightQuantizer, weight_codes

__all__ = ["TransposedWeightQuantizer"]


class TransposedWeightQuantizer(WeightQuantizer):
    """q(W) of a ConvTranspose weight, laid out ``[in, out/groups, *k]``: ``per_channel`` scales per *output*
    channel, as for every other layer (q is computed on the weight viewed ``[out, in/groups, *k]``)."""

    def __init__(self, groups: int = 1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.groups = groups

    def out_major(self, w: Tensor) -> Tensor:
        """``[in, out/g, *k]`` -> contiguous ``[out, in/g, *k]`` (output channel ``o = g * out/g + j``)."""
        g, (i, o), k = self.groups, w.shape[:2], w.shape[2:]
        return w.reshape(g, i // g, o, *k).transpose(1, 2).reshape(g * o, i // g, *k).contiguous()

    def in_major(self, v: Tensor, shape: torch.Size) -> Tensor:
        """Inverse of :meth:`out_major` back to ``shape``."""
        g, (i, o), k = self.groups, shape[:2], shape[2:]
        return v.reshape(g, o, i // g, *k).transpose(1, 2).reshape(shape)

    @override
    def forward(self, w: Tensor) -> Tensor:
        if not self.per_channel or w.dim() < 2:
            return super().forward(w)
        return self.in_major(super().forward(self.out_major(w)), w.shape)

    @torch.no_grad()
    @override
    def quantize(self, w: Tensor) -> Tensor:
        if not self.per_channel or w.dim() < 2:
            return super().quantize(w)
        return self.in_major(super().quantize(self.out_major(w)), w.shape)

    @torch.no_grad()
    @override
    def weight_codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(codes, scale) with ``codes * scale == q(W)`` in W's own layout (for packed export); the per-channel
        scale has shape ``[in, out/groups, 1, ...]`` so it broadcasts against the codes."""
        if not self.per_channel or w.dim() < 2:
            return super().weight_codes(w)
        codes, scale = weight_codes(
            self.out_major(w), self.bits, self.per_channel, self.ternary_scale, self.binary_scale
        )
        g, (i, o) = self.groups, w.shape[:2]
        per_weight = scale.reshape(g, 1, o).expand(g, i // g, o).reshape(i, o, *([1] * (w.dim() - 2)))
        return self.in_major(codes, w.shape), per_weight

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups} (ConvTranspose layout)"
