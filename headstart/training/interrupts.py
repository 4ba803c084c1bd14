"""How a run survives an interrupt: Ctrl-C or SIGTERM (`StopOnSignal`) lets the current step
finish; the loop then saves and raises `TrainingInterrupted`, whose message is the command that
resumes. `RankLost`: another rank of a data-parallel run died; `TrainingDiverged`: the loss is no
longer finite."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

from headstart.io.runstate import STATE_FILE
from headstart.runtime.distributed import resume_command

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Raised after a Ctrl-C (or SIGTERM) once the current step is done and the run state is saved;
    its message says how to go on."""

    def __init__(self, out: Path, epoch: int, step: int, *, while_: str | None = None) -> None:
        where = f"while {while_}" if while_ else f"in epoch {epoch} after step {step}"
        if (Path(out) / STATE_FILE).exists():
            hint = f"the run state is saved. Resume with: {resume_command(out)}"
        else:
            hint = "no epoch had ended, so there is nothing to resume: run the same command again"
        super().__init__(f"interrupted {where}; {hint}")
        self.out, self.epoch, self.step = out, epoch, step


class RankLost(TrainingInterrupted):
    """Another rank of a data-parallel run died or stopped answering (runtime/distributed.py): this one
    ends too, and its message says what was saved and how to resume."""

    def __init__(self, out: Path, rank: int, world: int, reason: str, saved_at: str | None, *,
                 main: bool) -> None:
        Exception.__init__(self)
        first = reason.strip().splitlines()[0] if reason.strip() else "no reason given"
        if not main:  # the run state is rank 0's
            hint = f"resume all ranks from rank 0's run state with: {resume_command(out)}"
        elif saved_at:
            hint = f"the run state saved at {saved_at} is kept; resume all ranks with: {resume_command(out)}"
        else:
            hint = "no run state was saved yet: run the same command again"
        self.args = (f"rank {rank} of {world}: another rank died or stopped answering ({first[:300]}); {hint}",)
        self.out, self.epoch, self.step = out, 0, 0


class StopRequested(Exception):
    """Raised by work that cannot save where it stands (features, a plan) when a stop is asked for."""


class TrainingDiverged(ValueError):
    """The loss is no longer a finite number: the run stops, and the epoch is never saved as best."""

    def __init__(self, epoch: int, step: int | None, loss: float, lr: float, image_size: int | None) -> None:
        where = f"epoch {epoch}, step {step}" if step is not None else f"epoch {epoch}'s validation"
        causes = [f"a learning rate too high (--lr {lr:g}; the tutorial's 0.001 suits fine-tuning)"]
        if image_size is not None and image_size < 64:
            causes.append(f"images too small for the network (--image-size {image_size}; 224 is usual, 64 the least "
                          "for a ResNet)")
        super().__init__(f"the loss became {loss} in {where}: the run diverged. Likely causes: {'; or '.join(causes)}. "
                         "Checkpoints of earlier epochs are kept; nothing of this one is saved")
        self.epoch, self.step, self.loss = epoch, step, loss


class StopOnSignal:
    """While active, SIGINT and SIGTERM set a flag instead of killing: the loop finishes its step,
    saves and raises TrainingInterrupted. A second SIGINT interrupts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: finishing the current step, then saving (Ctrl-C again to abort at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
