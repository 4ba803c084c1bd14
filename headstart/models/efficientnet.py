"""EfficientNet-Lite0/1/2 with the key names of the lukemelas-style PyTorch port, so its weight files
load as they are: `_conv_stem`, `_bn0`, `_blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,
_project_conv,_bn2}`, `_conv_head`, `_bn1`, `_fc` (the classifier).

Lite is EfficientNet made for mobile CPUs: no squeeze-excitation, ReLU6 instead of swish, and the
stem (32 channels) and head (1280) kept fixed as the network scales. The weights come from
TensorFlow, so every conv pads TF-style (models/layers.py) and BatchNorm epsilon is 1e-3; inputs
are RGB scaled to [-1, 1] (mean = std = 0.5).

Shapes (Lite0, 224x224 input): stem -> (32, 112, 112); the blocks end at (320, 7, 7); the head conv
gives (1280, 7, 7); pooled features (1280,). Cost per image forward: about 0.4 GFLOP for Lite0,
0.6 for Lite1 (240x240), 0.9 for Lite2 (260x260); ResNet50 is 8.2.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from headstart.models.kernels import batch_norm_act
from headstart.models.layers import pad_same
from headstart.models.stages import Stage, StagedNet, sequential_stages

torch.fx.wrap("pad_same")

# (kernel, first stride, expansion, output channels, repeats) per stage, before scaling
STAGES = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3), (5, 1, 6, 112, 3),
          (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
# variant -> (width multiplier, depth multiplier, input size)
VARIANTS = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260)}
BN_EPS = 1e-3  # TensorFlow's BatchNorm epsilon
BN_MOMENTUM = 0.01  # TF's decay 0.99, in torch's convention


def scale_width(channels: int, multiplier: float, divisor: int = 8) -> int:
    """Channels times `multiplier`, rounded to a multiple of `divisor`, never down by over 10%."""
    c = channels * multiplier
    rounded = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * c else rounded


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual without squeeze-excitation: 1x1 expand (skipped at expansion 1) -> k x k
    depthwise (stride s) -> 1x1 linear projection; a residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.kernel, self.stride = kernel, stride
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        # stride 1: TF's padding is symmetric, so the conv pads itself; stride 2: pad_same in forward
        self.pad_same = stride > 1
        self._depthwise_conv = nn.Conv2d(hidden, hidden, kernel, stride, 0 if self.pad_same else (kernel - 1) // 2,
                                         groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def _depthwise(self, y: torch.Tensor) -> torch.Tensor:
        # oneDNN's bf16 depthwise backward is slow on CPUs (a 5x5 or strided one takes 1.6-5x its fp32
        # time here), so a CPU training step under bf16 autocast runs this conv in fp32: EfficientNet-
        # Lite0 fine-tunes at about 20 img/s instead of 13. Inference keeps bf16, which is faster there.
        if self.training and y.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
            with torch.autocast("cpu", enabled=False):
                return self._depthwise_conv(y.float())
        return self._depthwise_conv(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # batch_norm_act: BatchNorm with its ReLU6 or residual add, fused in bf16 training (headstart/kernels)
        y = batch_norm_act(self._bn0, self._expand_conv(x), act="relu6") if self.expand else x
        y = pad_same(y, self.kernel, self.stride) if self.pad_same else y
        y = batch_norm_act(self._bn1, self._depthwise(y), act="relu6")  # fp32 here in CPU training: unfused
        return batch_norm_act(self._bn2, self._project_conv(y), residual=x if self.residual else None)


class EfficientNetLite(StagedNet):
    def __init__(self, variant: str = "lite0", *, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"EfficientNet variant {variant!r} is not one of {sorted(VARIANTS)}")
        width, depth, _ = VARIANTS[variant]
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[nn.Module] = []
        self._stage_bounds: list[tuple[str, int, int]] = []  # (name, start, stop) in `_blocks`
        cin = 32
        for i, (kernel, stride, expand, channels, repeats) in enumerate(STAGES):
            cout = scale_width(channels, width)
            if 0 < i < len(STAGES) - 1:  # Lite keeps the first and last stages one block deep
                repeats = int(math.ceil(repeats * depth))
            self._stage_bounds.append((f"stage{i + 1}", len(blocks), len(blocks) + repeats))
            for j in range(repeats):
                blocks.append(MBConv(cin, cout, kernel, stride if j == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self.num_features = 1280
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.uniform_(m.weight, -1 / math.sqrt(m.in_features), 1 / math.sqrt(m.in_features))
                nn.init.zeros_(m.bias)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_act(self._bn0, self._conv_stem(pad_same(x, 3, 2)), act="relu6")

    def _head_conv(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_act(self._bn1, self._conv_head(x), act="relu6")

    def stages(self) -> list[Stage]:
        """stem (_conv_stem, _bn0) -> (32, 112, 112) at 224x224; stage1..stage7 (the `_blocks` of
        each row of STAGES; Lite0: 1, 2, 2, 3, 3, 4, 1 blocks) end at 16, 24, 40, 80, 112, 192, 320
        channels and 112, 56, 28, 14, 14, 7, 7 pixels; conv_head (_conv_head, _bn1) -> (1280, 7, 7)."""
        return [Stage("stem", self._stem, (self._conv_stem, self._bn0)),
                *sequential_stages(self._blocks, self._stage_bounds),
                Stage("conv_head", self._head_conv, (self._conv_head, self._bn1))]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """conv_head's (N, 1280, h, w) -> (N, 1280) features (the inputs: images scaled to [-1, 1])."""
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self._fc(self._dropout(features))


def efficientnet_lite(variant: str, *, num_classes: int = 1000) -> EfficientNetLite:
    """Build EfficientNet-Lite0, 1 or 2 (`variant` "lite0", "lite1", "lite2")."""
    return EfficientNetLite(variant, num_classes=num_classes)
