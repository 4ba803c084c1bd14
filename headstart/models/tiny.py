"""A tiny CNN (1,450 parameters with a 2-class head) with the same interface as the real backbones, for fast tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """Two strided conv-BN-ReLU blocks, global pooling, `fc` head. 32x32 input -> (16,) features."""

    def __init__(self, *, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
        )
        self.num_features = width
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))
