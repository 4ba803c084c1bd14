"""MobileNetV2 with torchvision's state-dict key names (a torchvision weight file loads as is).

Shapes for a 224x224 input: stem -> (32, 112, 112); the inverted-residual stages end at
(320, 7, 7); a 1x1 conv to (1280, 7, 7); pooled features (1280,); `classifier.1` is the head.
Cost: about 0.3 GMACs (0.6 GFLOP) per 224x224 image forward, 1/14 of ResNet50.
Each BatchNorm goes through `batch_norm_act` with its ReLU6 or residual add (fused when training in
bf16, see headstart/kernels).
"""

from __future__ import annotations

import torch
from torch import nn

from headstart.models.kernels import batch_norm_act
from headstart.models.stages import Stage, StagedNet, sequential_stages

# (expansion t, output channels c, repeats n, first stride s) per stage
_STAGES = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class ConvBNReLU6(nn.Sequential):
    """Conv2d -> BatchNorm2d -> ReLU6, as torchvision's (same keys: .0 conv, .1 BatchNorm); forward applies
    the ReLU6 (.2) through batch_norm_act."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_act(self[1], self[0](x), act="relu6")


class InvertedResidual(nn.Module):
    """1x1 expand (skipped when t = 1) -> 3x3 depthwise -> 1x1 linear projection; residual when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = [ConvBNReLU6(cin, hidden, 1)] if expand != 1 else []
        layers += [ConvBNReLU6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *body, project, bn = self.conv
        y = x
        for layer in body:
            y = layer(y)
        return batch_norm_act(bn, project(y), residual=x if self.use_residual else None)


class MobileNetV2(StagedNet):
    def __init__(self, *, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNReLU6(3, 32, 3, 2)]
        self._stage_bounds = [("stem", 0, 1)]  # (name, start, stop) in `features`
        cin = 32
        for k, (t, c, n, s) in enumerate(_STAGES, 1):
            self._stage_bounds.append((f"stage{k}", len(layers), len(layers) + n))
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        self._stage_bounds.append(("conv_head", len(layers), len(layers) + 1))
        layers.append(ConvBNReLU6(cin, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.num_features = 1280
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[Stage]:
        """stem (features.0) -> (32, 112, 112); stage1..stage7 (the inverted-residual stages of
        _STAGES: features.1 ... features.17) end at (16, 112, 112), (24, 56, 56), (32, 28, 28),
        (64, 14, 14), (96, 14, 14), (160, 7, 7), (320, 7, 7); conv_head (features.18) -> (1280, 7, 7)."""
        return sequential_stages(self.features, self._stage_bounds)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """conv_head's (N, 1280, h, w) -> (N, 1280) features."""
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)  # dropout, then the head (classifier.1)

