"""LeNet-5 with an affine-free BatchNorm before each activation (YLZ19 Table 1)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["LeNet5"]


class LeNet5(nn.Module):
    """LeNet-5 (6-16-120-84) for 28x28 inputs; ``BatchNorm(affine=False)`` before every ReLU (YLZ19).

    The affine-free BatchNorm keeps each activation's input near N(0, 1), the assumption behind the fixed
    resolution alpha of docs/math.md §1.3. Every ReLU is its own module so each call site gets its own quantizer.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6, affine=False)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5, bias=False)
        self.bn2 = nn.BatchNorm2d(16, affine=False)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * 5 * 5, 120, bias=False)
        self.bn3 = nn.BatchNorm1d(120, affine=False)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84, bias=False)
        self.bn4 = nn.BatchNorm1d(84, affine=False)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.fc1(self.flatten(x))))
        x = self.relu4(self.bn4(self.fc2(x)))
        return self.fc3(x)
