"""Callbacks: what a person watches, and what may stop a run.

`training.fit` calls every callback's hooks; each hook is optional:

    on_start(info)                    the run's classes, counts, config, runtime
    on_step(phase, epoch, step, ...)  after each training step (or a batch of features, of validation)
    on_epoch_end(record)              an epoch's line of metrics (EpochRecord)
    on_message(text)                  something a person should read (the estimate, the plan...)
    on_validation_end(run)            after each epoch's validation, epoch 0 included: `run` (a `Run`) shows
                                      the model, the config, the history and the epoch, and `run.stop(reason)`
                                      ends the run after this epoch (as Lightning's trainer.should_stop)

Two callbacks stop runs: `EarlyStopping` (validation has stopped improving; `--patience`) and
`StopAtBudget` (another epoch would end after `--budget`). Both decide from the history alone, so a
resumed run decides as an uninterrupted one would: `fit` asks them again about the last saved epoch
before it trains on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from headstart.runtime.clock import format_duration

if TYPE_CHECKING:
    from torch import nn

    from headstart.data import DatasetSplits
    from headstart.io.runstate import EpochRecord


class Callback:
    """Every method is optional. (Diagnostics go to the `headstart` logger; the library never prints.)"""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, phase: str, epoch: int, step: int, steps: int, loss: float | None) -> None: ...
    def on_epoch_end(self, record: "EpochRecord") -> None: ...
    def on_message(self, text: str) -> None: ...
    def on_validation_end(self, run: "Run") -> None: ...


@dataclass
class Run:
    """What a callback sees of the run after an epoch's validation, and how it stops it."""

    model: "nn.Module"
    config: Any  # training.TrainConfig
    splits: "DatasetSplits"
    history: list["EpochRecord"]  # every epoch so far, epoch 0 first where the strategy has one
    epochs: int  # the most the run may train (after epoch 0)
    started: float  # perf_counter at the run's start (earlier processes of a resumed run counted)
    stopped: str | None = None  # why the run ends after this epoch
    val_images: int = field(init=False)

    def __post_init__(self) -> None:
        self.val_images = len(self.splits.val)

    @property
    def epoch(self) -> int:
        return self.history[-1].epoch if self.history else 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def stop(self, reason: str) -> None:
        """End the run after this epoch (the first reason given is kept)."""
        self.stopped = self.stopped or reason


# ---------------------------------------------------------------------------------------------
# Early stopping.

LOSS_DELTA = 0.02  # a lower validation loss counts as progress when it is at least 2% below the best so far


def accuracy_noise(accuracy: float, images: int) -> float:
    """One standard error of a validation accuracy measured on `images` images, at least one image:
    an accuracy that rises by less is no sign of progress (153 images at 0.95: 0.018, 2.7 images)."""
    return max(math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(images, 1)), 1 / max(images, 1))


def last_improvement(history: Sequence["EpochRecord"], images: int) -> int:
    """The last epoch of `history` that improved on every epoch before it by more than noise: a
    validation loss at least LOSS_DELTA below the lowest so far, or an accuracy above the highest so
    far by more than `accuracy_noise`. The first epoch counts as one."""
    best_loss, best_acc, last = math.inf, -1.0, history[0].epoch if history else 0
    for r in history:
        if (r.val_loss < best_loss * (1 - LOSS_DELTA)
                or r.val_acc > best_acc + (accuracy_noise(best_acc, images) if best_acc >= 0 else 0)):
            last = r.epoch
        best_loss, best_acc = min(best_loss, r.val_loss), max(best_acc, r.val_acc)
    return last


@dataclass
class EarlyStopping(Callback):
    """Stop when validation has stopped improving: `patience` epochs after the last that improved
    by more than noise (`last_improvement`: on loss as well as accuracy, the accuracy's noise from
    the split's size). Where epoch 0 is the head fitted on the features, a fine-tune that does not
    beat it within `patience` epochs ends there, and the head is the result."""

    patience: int

    def on_validation_end(self, run: Run) -> None:
        last = last_improvement(run.history, run.val_images)
        if run.epoch - last >= self.patience and run.epoch < run.epochs:
            what = "the head fitted on the features (epoch 0)" if last == 0 and run.history[0].epoch == 0 else \
                f"epoch {last}"
            run.stop(f"validation has not improved on {what} for {run.epoch - last} epoch(s) (--patience "
                     f"{self.patience}: a loss {LOSS_DELTA:.0%} lower, or an accuracy higher by more than its noise "
                     f"on {run.val_images} images)")


@dataclass
class StopAtBudget(Callback):
    """Stop before an epoch that, as long as the last one trained, would end after `budget` seconds."""

    budget: float

    def on_validation_end(self, run: Run) -> None:
        trained = [r for r in run.history if r.epoch >= 1]
        if not trained or run.epoch >= run.epochs:
            return
        spent = run.elapsed()
        if spent + trained[-1].epoch_time > self.budget:
            run.stop(f"another epoch (about {format_duration(trained[-1].epoch_time)}) would end after the budget "
                     f"of {format_duration(self.budget)}, {format_duration(spent)} spent")
