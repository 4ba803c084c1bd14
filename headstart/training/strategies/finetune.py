"""finetune, the tutorial's: every parameter trains, BatchNorm statistics included; SGD momentum 0.9."""

from __future__ import annotations

from typing import Any

from torch import nn

from headstart.data import DatasetSplits
from headstart.training.strategies.base import ImageEpochs


class FineTune(ImageEpochs):
    """Every layer trains, BatchNorm statistics included."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self.runtime.prepare(model)
        self._image_loaders()
        self.forward = model
