"""ResNet-18/34/50/101/152 with torchvision's state-dict key names.

A torchvision weight file loads as is. Two layouts of the bottleneck:
- torchvision's ("v1.5", default): the stride-2 of stages 2-4 sits in the 3x3 conv;
- the original ("v1", `stride_in_1x1=True`): it sits in the first 1x1 conv, as in Keras and Caffe
  ResNet50 weights.
Two paddings of the strided layers (conv1, the max pool, the stride-2 convs):
- "torch" (default): symmetric, as torchvision, Keras (explicit ZeroPadding) and Caffe;
- "same": TensorFlow/MindSpore's pad_mode='same' (see layers.py), which networks trained in
  MindSpore, such as the MindSpore ResNet50 tutorial's, need to give the same logits here.

Shapes for a 224x224 input: stem -> (64, 56, 56); layer1 -> (256, 56, 56); layer2 -> (512, 28, 28);
layer3 -> (1024, 14, 14); layer4 -> (2048, 7, 7); pooled features (2048,) for ResNet50.
Cost: ResNet50 is about 4.1 GMACs (8.2 GFLOP) per 224x224 image forward.

Every BatchNorm goes through `batch_norm_act` with the ReLU and the residual add that follow it: one
fused kernel in bf16 training (headstart/kernels), the modules themselves otherwise, so traced
graphs still fold each BatchNorm into its conv.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from headstart.models.kernels import batch_norm_act
from headstart.models.layers import pad_same
from headstart.models.stages import Stage, StagedNet

torch.fx.wrap("pad_same")
PADDINGS = ("torch", "same")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def _shortcut(downsample: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The projection shortcut: downsample = Sequential(1x1 conv, BatchNorm)."""
    conv, bn = downsample
    return batch_norm_act(bn, conv(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 stride_in_1x1: bool = False, same: bool = False) -> None:
        super().__init__()
        self.pad_same = same and stride > 1  # the strided 3x3 pads TF-style, in forward
        self.conv1 = conv3x3(cin, planes, stride)
        if self.pad_same:
            self.conv1.padding = (0, 0)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else _shortcut(self.downsample, x)
        out = batch_norm_act(self.bn1, self.conv1(pad_same(x, 3, 2) if self.pad_same else x), act="relu")
        return batch_norm_act(self.bn2, self.conv2(out), act="relu", residual=identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 stride_in_1x1: bool = False, same: bool = False) -> None:
        super().__init__()
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.pad_same = same and s3 > 1  # the strided 3x3 pads TF-style, in forward
        self.conv1 = conv1x1(cin, planes, s1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, s3)
        if self.pad_same:
            self.conv2.padding = (0, 0)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else _shortcut(self.downsample, x)
        out = batch_norm_act(self.bn1, self.conv1(x), act="relu")
        out = batch_norm_act(self.bn2, self.conv2(pad_same(out, 3, 2) if self.pad_same else out), act="relu")
        return batch_norm_act(self.bn3, self.conv3(out), act="relu", residual=identity)


class ResNet(StagedNet):
    """A ResNet; `fc` is the classifier, `forward_features` gives the pooled features."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], *,
                 num_classes: int = 1000, stride_in_1x1: bool = False, padding: str = "torch") -> None:
        super().__init__()
        if padding not in PADDINGS:
            raise ValueError(f"padding={padding!r} is not one of {PADDINGS}; 'same' is for weights trained in "
                             "TensorFlow or MindSpore")
        self.stride_in_1x1 = stride_in_1x1
        self.same = padding == "same"
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=0 if self.same else 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=0 if self.same else 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int,
                    stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, self.stride_in_1x1, self.same)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, 224, 224) -> (N, 64, 56, 56)."""
        if self.same:  # (N, 3, 224, 224) pads 2 before, 3 after; the pool's input 0 before, 1 after
            x = batch_norm_act(self.bn1, self.conv1(pad_same(x, 7, 2)), act="relu")
            return self.maxpool(pad_same(x, 3, 2, value=float("-inf")))
        return self.maxpool(batch_norm_act(self.bn1, self.conv1(x), act="relu"))

    def stages(self) -> list[Stage]:
        """stem -> (64, 56, 56), layer1 -> (256, 56, 56), layer2 -> (512, 28, 28), layer3 -> (1024,
        14, 14), layer4 -> (2048, 7, 7) for ResNet50 at 224x224. Forward GFLOP per image: 0.24, 1.4,
        2.1, 3.0, 1.6 (8.2 in all)."""
        layers = [self.layer1, self.layer2, self.layer3, self.layer4]
        return [Stage("stem", self._stem, (self.conv1, self.bn1, self.maxpool)),
                *(Stage(f"layer{i}", layer, (layer,)) for i, layer in enumerate(layers, 1))]

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """layer4's (N, num_features, h, w) -> (N, num_features) features (2048 for ResNet50)."""
        return torch.flatten(self.avgpool(x), 1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)


_DEPTHS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def resnet(depth: int, *, num_classes: int = 1000, stride_in_1x1: bool = False, padding: str = "torch") -> ResNet:
    """Build a ResNet of depth 18, 34, 50, 101 or 152 (`padding`: "torch" or "same", see above)."""
    if depth not in _DEPTHS:
        raise ValueError(f"ResNet depth {depth} is not one of {sorted(_DEPTHS)}")
    block, layers = _DEPTHS[depth]
    return ResNet(block, layers, num_classes=num_classes, stride_in_1x1=stride_in_1x1, padding=padding)
