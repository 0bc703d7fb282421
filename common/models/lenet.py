"""LeNet-5 for 28x28 digits, as a routed model so :mod:`common.split` can cut it anywhere."""

from __future__ import annotations

from torch import nn


def _layer(module: nn.Module) -> nn.Module:
    module.f = -1  # type: ignore[assignment]
    return module


class LeNet5(nn.Module):
    """Layers: 0 conv1, 1 pool1, 2 conv2, 3 pool2, 4 flatten, 5 fc1, 6 fc2, 7 classifier."""

    default_image_size = 28

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.model = nn.Sequential(
            _layer(nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU())),
            _layer(nn.MaxPool2d(2)),
            _layer(nn.Sequential(nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU())),
            _layer(nn.MaxPool2d(2)),
            _layer(nn.Flatten()),
            _layer(nn.Sequential(nn.Linear(16 * 5 * 5, 120), nn.ReLU())),
            _layer(nn.Sequential(nn.Linear(120, 84), nn.ReLU())),
            _layer(nn.Linear(84, num_classes)),
        )

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.model(x)
