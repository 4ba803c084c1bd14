"""Named stages: a backbone's `forward_features` as a list of steps, so that training can start at
any of them (the `partial` and `gradual` strategies) while the steps below run frozen.

    model.stages() -> [Stage("stem", ...), Stage("layer1", ...), ..., Stage("layer4", ...)]
    model.forward_features(x) == model.pool(run_stages(model.stages(), x))

Every backbone's stages cover all of its feature layers; what follows them is `pool` (global
average pooling, flattened) and `forward_head` (dropout where the network has one, and the head):
model(x) == model.forward_head(model.forward_features(x)).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Stage:
    name: str
    forward: Callable[[torch.Tensor], torch.Tensor]
    modules: tuple[nn.Module, ...]  # whose parameters, buffers and train/eval mode are the stage's


def run_stages(stages: Sequence[Stage], x: torch.Tensor) -> torch.Tensor:
    for stage in stages:
        x = stage.forward(x)
    return x


class StagedNet(nn.Module):
    """A backbone as headstart's strategies see it: `stages()` (the named parts, in order), `pool`
    (the last stage's output -> (N, F) features) and `forward_head` ((N, F) -> (N, classes)). The
    forward passes are these, the same for every backbone."""

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) normalised images -> (N, F) pooled features."""
        return self.pool(run_stages(self.stages(), x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def chain(modules: Sequence[nn.Module]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A stage's forward through `modules` in order. (A function, not a new nn.Sequential: torch.fx
    traces through calls of the network's own submodules only, and the inference copies fold their
    convs and BatchNorms with it.)"""
    return functools.partial(_chain, tuple(modules))


def _chain(modules: tuple[nn.Module, ...], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


def sequential_stages(seq: nn.Sequential | nn.ModuleList, bounds: Sequence[tuple[str, int, int]]) -> list[Stage]:
    """Stages made of slices of `seq`: (name, start, stop) each."""
    return [Stage(name, chain(seq[start:stop]), tuple(seq[start:stop])) for name, start, stop in bounds]


def stage_flops(model: nn.Module, image_size: int) -> list[float]:
    """Forward FLOP per image of each of `model.stages()` at image_size x image_size (2 per
    multiply-add of every conv and linear layer; BatchNorm and activations are not counted). Run
    it on a model built on the "meta" device: no memory, no arithmetic (ResNet50: 0.24, 1.4, 2.1,
    3.0 and 1.6 GFLOP)."""
    count = [0.0]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            count[0] += 2 * output.numel() * module.in_channels // module.groups * kh * kw
        elif isinstance(module, nn.Linear):
            count[0] += 2 * output.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        x = torch.empty(1, 3, image_size, image_size, device=next(model.parameters()).device)
        flops = []
        with torch.no_grad():
            for stage in model.stages():
                count[0] = 0.0
                x = stage.forward(x)
                flops.append(count[0])
        return flops
    finally:
        for h in handles:
            h.remove()
