"""A tiny CNN (1,450 parameters with a 2-class head) with the same interface as the real backbones, for fast tests."""

from __future__ import annotations

import torch
from torch import nn

from headstart.models.stages import Stage, StagedNet, sequential_stages


class TinyNet(StagedNet):
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

    def stages(self) -> list[Stage]:
        """block1 (features.0-2) -> (8, 16, 16), block2 (features.3-5) -> (16, 8, 8) at 32x32."""
        return sequential_stages(self.features, [("block1", 0, 3), ("block2", 3, 6)])

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.features[6](x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

