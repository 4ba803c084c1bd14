"""partial: the stages from --train-from up train with the head, the stages below run frozen
(ResNet50 from layer4 at 224: 6.6 GFLOP frozen forward + 4.9 trained per image, where a fine-tune
costs 24.3). gradual: epoch 0 fits the head to convergence on the backbone's features
(analysis/linear.py); then as partial, the backbone at a fraction of the head's learning rate
(fastai's recipe)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from headstart.data import DatasetSplits
from headstart.io.runstate import SavedRun
from headstart.models import meta_model
from headstart.models.stages import stage_flops
from headstart.training.epochs import StagesFrom, freeze_below, set_train_mode
from headstart.training.strategies.base import Baseline, ImageEpochs, head_on_features


class Partial(ImageEpochs):
    """The stages from `config.train_from` (default: the last) up train with the head, SGD
    momentum 0.9; the stages below run in eval mode under no_grad, their BatchNorm statistics kept."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self.stage_names = [s.name for s in model.stages()]
        self.stage_flops = stage_flops(meta_model(model.arch, **model.arch_kwargs), self.pre.train_crop)
        self.train_from(self.config.train_from or self.stage_names[-1])
        self.runtime.prepare(model)
        self._image_loaders()

    def train_from(self, name: str) -> None:
        """Train the stages from `name` up (and the head); freeze the ones below."""
        if name not in self.stage_names:
            raise ValueError(f"train_from {name!r} is not a stage of {self.model.arch}: choose one of "
                             f"{', '.join(self.stage_names)} (`headstart models` lists them)")
        self.first = self.stage_names.index(name)
        self.frozen = freeze_below(self.model, self.first)
        self.forward = StagesFrom(self.model, self.first)

    @property
    def trained_fraction(self) -> float:
        """The share of the forward FLOP that trains (ResNet50 from layer4: 0.2, from layer3: 0.56)."""
        return sum(self.stage_flops[self.first:]) / max(sum(self.stage_flops), 1.0)

    def set_mode(self) -> None:
        set_train_mode(self.model, frozen=self.frozen)


class Gradual(Partial):
    """Epoch 0: the head fitted to convergence on the backbone's features (L-BFGS, L2 chosen by
    cross-validation: analysis/linear.py). Then as partial, with the backbone's learning rate
    `config.backbone_lr` times the head's: a head that is already good sends small gradients into
    the pretrained layers instead of the large ones of a random head (fastai's fine_tune recipe)."""

    def parameters(self) -> list[dict[str, Any]]:
        head = list(self.head.parameters())
        ids = {id(p) for p in head}
        backbone = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": head}, {"params": backbone, "lr": self.config.lr * self.config.backbone_lr}]

    def start(self, saved: SavedRun | None) -> Baseline | None:
        if saved is not None:
            return super().start(saved)
        fit, baseline = head_on_features(self)
        with torch.no_grad():
            self.head.weight.copy_(fit.weight)
            self.head.bias.copy_(fit.bias)
        return baseline
