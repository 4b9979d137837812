"""The two-linear-layer network of LYX21: ``x -> W1 x -> sigma -> W2 (.)`` with a quantizable ReLU."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["TwoLayer"]


class TwoLayer(nn.Module):
    """Two linear layers with a ReLU between them (LYX21); the ReLU is what ``QuantizeActivations`` quantizes.

    ``batch_norm=True`` puts an affine-free BatchNorm before the ReLU so its input is about N(0, 1) and the
    fixed resolution of docs/math.md §1.3 applies (YLZ19's device, ours for this network).
    """

    def __init__(
        self, in_features: int = 784, hidden: int = 1024, num_classes: int = 10, batch_norm: bool = True
    ):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, hidden, bias=not batch_norm)
        self.bn1 = nn.BatchNorm1d(hidden, affine=False) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.bn1(self.fc1(self.flatten(x)))))
