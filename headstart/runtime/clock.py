"""The run's time: durations as people write them, the estimate said after the first few training
steps, and the budget.

    estimated 41.0 s likely (stopping after epoch 2: --patience 2 ends a fine-tune that does not
    improve), 2.7 min at most: 10 epochs x 14 steps at 0.899 s/step (the median of 5 steps) + 10
    validations of about 2.5 s + 10.4 s spent so far + 6.6 s to calibrate

The estimate is the time spent so far (set-up, features, epoch 0, the steps measured) plus the steps
left at the measured rate plus a validation per epoch left, which the strategy estimates from a
step's time (strategies.Strategy.validation_seconds), plus the calibration's backbone pass after the
last epoch (Strategy.finish_seconds). "At most" counts every epoch; "likely", where
early stopping is on, counts the epochs to its first chance to stop (`patience` epochs after the
first one validated, epoch 0 where there is one): on the panel
of bench/time_to_accuracy.py every default run stopped there (bench/RESULTS.md).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, fields
from typing import Any

_UNITS = {"s": 1, "m": 60, "h": 3600}
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(text: str | float) -> float:
    """Seconds in '90', '90s', '5m', '1.5h', '1h30m'; ValueError naming the format otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        m = _DURATION.fullmatch(str(text).strip().lower())
        if not m or not any(m.groups()):
            raise ValueError(f"duration {text!r} is not one like 90s, 5m, 1.5h or 1h30m")
        h, mins, s = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mins * 60 + s
    if not seconds > 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


def format_duration(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.1f} s"


@dataclass
class Estimate:
    """How long a run will take, said after its first few training steps."""

    total_s: float  # at most: the whole run to its last epoch (spent_s and what is left)
    spent_s: float  # before the estimate: set-up, features, epoch 0, the steps measured
    epochs: int
    steps_per_epoch: int
    step_s: float
    measured_steps: int
    validation_s: float  # one validation
    likely_s: float = 0.0  # likely: to the first epoch after which early stopping may end the run
    likely_epochs: int = 0  # that epoch (= epochs without early stopping)
    patience: int = 0  # early stopping's (0: off)
    finish_s: float = 0.0  # after the last epoch: the backbone pass that fits the temperature and unknown test

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Estimate":
        """From summary.json (a run from before the likely estimate has the most only)."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    @property
    def stops_early(self) -> bool:
        """Whether the likely run ends before the last epoch (early stopping on, and due before it)."""
        return 0 < self.likely_epochs < self.epochs

    def short(self) -> str:
        """'41.0 s likely, 162.1 s at most', or the most alone."""
        if self.stops_early:
            return f"{self.likely_s:.1f} s likely, {self.total_s:.1f} s at most"
        return f"{self.total_s:.1f} s"

    def line(self) -> str:
        likely = (f"{format_duration(self.likely_s)} likely (stopping after epoch {self.likely_epochs}: --patience "
                  f"{self.patience} ends a fine-tune that does not improve), {format_duration(self.total_s)} at most"
                  if self.stops_early else format_duration(self.total_s))
        return (f"estimated {likely}: {self.epochs} epochs x {self.steps_per_epoch} steps at "
                f"{self.step_s:.3f} s/step (the median of {self.measured_steps} steps) + {self.epochs} validations "
                f"of about {format_duration(self.validation_s)} + {format_duration(self.spent_s)} spent so far"
                + (f" + {format_duration(self.finish_s)} to calibrate" if self.finish_s else ""))


class Clock:
    """A callback between the strategy and the caller's: it passes every event on, and after the
    first few training steps of this process it says how long the run will take: the median of
    steps 3 to 7 of an epoch (the first two warm up: memory, oneDNN's kernels for the backward; on
    hymenoptera they ran up to 1.5x the later ones)."""

    STEPS = 5  # steps measured
    WARMUP = 2  # steps not measured (fewer where an epoch is short)

    def __init__(self, inner: Any, *, started: float) -> None:
        self.inner, self.started = inner, started  # perf_counter at the run's start (earlier processes counted)
        self.estimate: Estimate | None = None
        self._strategy: Any = None
        self._patience = self._first_stop = 0
        self._times: list[float] = []
        self._epoch = -1

    def watch(self, strategy: Any, *, patience: int = 0, first_epoch: int = 1) -> None:
        """Estimate for `strategy` (its epochs, steps per epoch and validation time), from now on;
        `patience`: early stopping's (0: off), which may end the run `patience` epochs after the first
        one validated, `first_epoch` (0 where the strategy starts with a head fitted on the features)."""
        self._strategy, self._patience, self._first_stop = strategy, patience, first_epoch + patience

    def on_start(self, info: dict[str, Any]) -> None:
        self.inner.on_start(info)

    def on_step(self, phase: str, epoch: int, step: int, steps: int, loss: float | None) -> None:
        self.inner.on_step(phase, epoch, step, steps, loss)
        if phase != "train" or self._strategy is None or self.estimate is not None:
            return
        if epoch != self._epoch:  # intervals within one epoch only (not across a validation)
            self._epoch, self._times = epoch, []
        self._times.append(time.perf_counter())  # the end of each step of this epoch
        n = self._strategy.steps_per_epoch
        warmup = min(self.WARMUP, max(n - 2, 1))  # at least one step measured, where an epoch has two
        measured = min(self.STEPS, n - warmup)
        if measured >= 1 and len(self._times) == warmup + measured:
            self._estimate(epoch, step, measured)

    def _estimate(self, epoch: int, step: int, measured: int) -> None:
        s = self._strategy
        ends = self._times[-measured - 1:]
        step_s = statistics.median(b - a for a, b in zip(ends, ends[1:]))
        crop = getattr(s, "crop", lambda e: 1)  # an epoch's crop side: a step costs about its square
        cost = [(crop(e) / crop(epoch)) ** 2 for e in range(epoch, s.epochs + 1)]
        validation_s = s.validation_seconds(step_s * (crop(s.epochs) / crop(epoch)) ** 2)
        spent = time.perf_counter() - self.started
        finish_s = getattr(s, "finish_seconds", lambda step_s: 0.0)(step_s * (crop(s.epochs) / crop(epoch)) ** 2)

        def until(last: int) -> float:  # the run's seconds to the end of epoch `last`
            steps_left = sum(cost[1:last - epoch + 1]) * s.steps_per_epoch + (s.steps_per_epoch - step)
            return spent + steps_left * step_s + (last - epoch + 1) * validation_s + finish_s  # (this epoch's steps)

        likely = min(s.epochs, max(epoch, self._first_stop)) if self._patience else s.epochs
        self.estimate = Estimate(until(s.epochs), spent, s.epochs, s.steps_per_epoch, step_s, measured, validation_s,
                                 likely_s=until(likely), likely_epochs=likely, patience=self._patience,
                                 finish_s=finish_s)
        self.inner.on_message(self.estimate.line())

    def on_epoch_end(self, record: Any) -> None:
        self.inner.on_epoch_end(record)

    def on_message(self, text: str) -> None:
        self.inner.on_message(text)

    def on_validation_end(self, run: Any) -> None:
        getattr(self.inner, "on_validation_end", lambda run: None)(run)

