"""VGG-11 for CIFAR-10 (YLZ19 Table 1): 3x3 convs, BatchNorm before each ReLU, one linear classifier."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["VGG11"]

_CFG_11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 for 32x32 inputs; ``bn_affine=False`` gives YLZ19's affine-free BatchNorm before each ReLU."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, bn_affine: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in _CFG_11:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [
                    nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v), affine=bn_affine),
                    nn.ReLU(),
                ]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.flatten(self.features(x)))
