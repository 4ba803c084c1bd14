"""The optimizer, its per-step learning-rate schedule and the loss's class weights: the same for
every strategy. `Stepper.step(loss)` is one update."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from headstart.data import DatasetSplits
from headstart.io.runstate import SavedRun
from headstart.runtime.device import Runtime

if TYPE_CHECKING:
    from headstart.training.config import TrainConfig


@dataclass
class Stepper:
    """SGD with momentum, its per-step learning-rate schedule and (fp16 only) a gradient scaler:
    `step(loss)` is one update."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def build(cls, params: Sequence[nn.Parameter] | Sequence[dict[str, Any]], config: "TrainConfig",
              total_steps: int, runtime: Runtime, *, steps_per_epoch: int = 1) -> "Stepper":
        """`params`: the parameters that train, or parameter groups with their own "lr"."""
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        scheduler = make_scheduler(optimizer, config, total_steps, warmup_steps=round(config.warmup * steps_per_epoch))
        return cls(optimizer, scheduler, runtime.grad_scaler())

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step()

    def state_meta(self) -> dict[str, Any]:
        """What the run state's JSON holds of the schedule and the scaler (the optimizer's tensors
        are written by `runstate.write_run_state`)."""
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def restore(self, saved: SavedRun) -> None:
        saved.restore_optimizer(self.optimizer)
        self.scheduler.load_state_dict(saved.meta["scheduler"])
        if self.scaler is not None and saved.meta.get("scaler"):
            self.scaler.load_state_dict(saved.meta["scaler"])


def make_scheduler(optimizer: torch.optim.Optimizer, config: "TrainConfig", total_steps: int, *,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate per step, as a multiple of lr: a linear warm-up from 0.01 over the first
    `warmup_steps`, then constant, or cosine down to 0.01 over the rest of the run's `total_steps`."""
    warm, total = max(0, warmup_steps), max(1, total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return 0.01 + 0.99 * step / warm
        if config.schedule == "constant":
            return 1.0
        done = min(step - warm, total - warm) / max(total - warm, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(splits: DatasetSplits) -> torch.Tensor:
    """Inverse class frequency of the training split, normalised to mean 1: weight_c = N / (K * n_c)."""
    counts = torch.bincount(torch.tensor([s.label for s in splits.train]), minlength=len(splits.classes)).float()
    return counts.sum() / (len(counts) * counts.clamp(min=1))
