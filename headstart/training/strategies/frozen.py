"""frozen, the tutorial's: only the head trains (SGD momentum 0.5); the backbone runs in eval mode
under no_grad, so every backbone tensor stays bit-identical. `HeadOnFeatures` computes the
backbone's features once and trains the head on them (the default); `HeadOnFrozenBackbone` runs the
backbone on every step (--feature-cache off)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from headstart.data import DatasetSplits
from headstart.io.formats.safetensors import StateDict
from headstart.io.runstate import EpochProgress, SavedRun
from headstart.io.weights import weights_fingerprint
from headstart.models import freeze_backbone
from headstart.runtime.inference import Inference
from headstart.training.epochs import StagesFrom, Stop, set_train_mode, train_head_one_epoch
from headstart.training.optim import Stepper
from headstart.training.strategies.base import Baseline, ImageEpochs, Strategy, cached_features

if TYPE_CHECKING:
    from headstart.training.config import TrainConfig


class HeadOnly(Strategy):
    """Only the head trains; the backbone is frozen, so the run state holds the head (a few kB
    instead of 100 MB an epoch for ResNet50) and a fingerprint of the backbone, checked on resume.
    The loop keeps the best head in memory (and in the run state): `trained_part`."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        freeze_backbone(model, classifier=self.classifier)
        self.runtime.prepare(model)
        self.trained_part = f"{self.classifier}."
        self.fingerprint = weights_fingerprint(model, exclude=self.trained_part)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _head_tensors(self) -> StateDict:
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(self.trained_part)}

    def start(self, saved: SavedRun | None) -> Baseline | None:
        if saved is None:
            return None
        if saved.meta.get("backbone_fingerprint") != self.fingerprint:
            raise ValueError(f"the backbone weights ({self.config.weights}) are not those the run started with; "
                             "resume needs the same weights")
        try:
            _, unexpected = self.model.load_state_dict(saved.part("model"), strict=False)
        except RuntimeError as e:
            raise ValueError(f"run state does not fit the model: {e}") from e
        if unexpected:
            raise ValueError(f"run state does not fit the model: unexpected {unexpected[:5]}")
        return None

    def run_state(self) -> tuple[StateDict, StateDict, dict[str, Any]]:
        return self._head_tensors(), {}, {"partial_model": True, "backbone_fingerprint": self.fingerprint}


class HeadOnFeatures(HeadOnly):
    """The head trains on backbone features computed once per image (and augmented view): ten
    epochs cost one backbone pass instead of ten (`runtime/features.py`)."""

    def start(self, saved: SavedRun | None) -> Baseline | None:
        super().start(saved)  # the fingerprint is checked before any feature is computed
        self.features = cached_features(
            self.model, self.splits, config=self.config, pre=self.pre, runtime=self.runtime, callback=self.callback,
            fingerprint=self.fingerprint, stop=self.stop)
        train, val = self.features
        self._failed(self.splits.train, train.failed)
        self._failed(self.splits.val, val.failed)
        device = self.runtime.device
        self.train_x, self.train_y = train.features.to(device), train.labels.to(device)
        self.val_x = val.features.to(device)
        self.steps_per_epoch = math.ceil(len(self.train_y) / self.config.batch_size)
        return None

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        return train_head_one_epoch(self.head, self.train_x, self.train_y, stepper, batch_size=self.config.batch_size,
                                    seed=self.config.seed, epoch=epoch, callback=self.callback, progress=progress,
                                    stop=stop, weight=self.weight)

    def validate(self, epoch: int) -> Inference:
        self.head.eval()
        with torch.no_grad():
            logits = self.head(self.val_x).float().cpu()
        v = self.features[1]
        return Inference(logits, v.labels, v.indices, v.failed)


class HeadOnFrozenBackbone(ImageEpochs, HeadOnly):
    """The head trains on the frozen backbone's output for augmented images, the backbone run on
    every step (no feature cache)."""

    trained_fraction = 0.0

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self._image_loaders()
        self.forward = StagesFrom(model, len(model.stages()))

    def set_mode(self) -> None:
        set_train_mode(self.model, trainable=[self.head])


def frozen_strategy(model: nn.Module, splits: DatasetSplits, *, config: "TrainConfig", **kw: Any) -> HeadOnly:
    cls = HeadOnFrozenBackbone if config.feature_cache == "off" else HeadOnFeatures
    return cls(model, splits, config=config, **kw)
