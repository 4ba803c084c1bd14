"""Where a run stands, and how it survives an interrupt: progress, history, the state file, signals.

After every epoch (and at an interrupt, mid-epoch) `fit` writes `<out>/state.safetensors`: the
model tensors the strategy trains, optimizer state, the torch RNG and, as JSON, the epoch, the
progress within it, the best metric, the history, the scheduler and the config, in one atomically
written file, so that `headstart train --resume RUN` continues bit-identically on the CPU.

Ctrl-C or SIGTERM (`StopOnSignal`) lets the current step finish; the loop then saves and raises
`TrainingInterrupted`, whose message is the command that resumes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import STATE_FORMAT
from .distributed import resume_command
from .formats.safetensors import StateDict, read_tagged, write_tagged

log = logging.getLogger(__name__)

STATE_FILE = "state.safetensors"


@dataclass
class EpochRecord:
    """One row of metrics.csv: what an epoch did and how fast."""

    epoch: int
    epochs: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    val_balanced_acc: float
    epoch_time: float  # s, training + validation
    step_time: float  # s per training step
    images_per_s: float  # training images per second
    data_wait: float  # fraction of the training time spent waiting for the data loader
    lr: float
    elapsed: float = 0.0  # s since the run started, at the end of this epoch
    ranks: int = 1  # processes that trained it (data-parallel: distributed.py)
    global_batch: int = 0  # images per step, all ranks together (0: not recorded)

    def line(self) -> str:
        ranks = f"  {self.ranks} ranks, global batch {self.global_batch}" if self.ranks > 1 else ""
        return (f"epoch {self.epoch}/{self.epochs}  train loss {self.train_loss:.4f}  val loss {self.val_loss:.4f}  "
                f"val acc {self.val_acc:.4f} (balanced {self.val_balanced_acc:.4f})  time {self.epoch_time:.1f}s  "
                f"{self.step_time:.3f}s/step  {self.images_per_s:.1f} img/s  data wait {self.data_wait:.0%}{ranks}")


@dataclass
class EpochProgress:
    """Running totals of one training epoch. Saved with the run state, so that an epoch interrupted
    by Ctrl-C resumes where it stopped (the sampler skips the `steps` batches already done)."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    correct: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    interrupted: bool = False

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.images, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.images, 1)

    def add(self, loss: float, correct: int, n: int) -> None:
        self.steps += 1
        self.images += n
        self.loss_sum += loss * n
        self.correct += correct


@dataclass
class RunState:
    """Where a run stands; saved (with model and optimizer tensors) in `<out>/state.safetensors`."""

    epoch: int = 0  # epochs completed
    progress: EpochProgress = field(default_factory=EpochProgress)  # of epoch + 1, if interrupted in it
    best_acc: float = -1.0
    best_epoch: int = 0
    best_metrics: dict[str, Any] | None = None
    best_meta: dict[str, Any] | None = None  # checkpoint metadata of the best epoch
    history: list[EpochRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason, files that could not be decoded
    elapsed: float = 0.0  # wall seconds of the run so far, every process that worked on it

    def skip(self, path: str, reason: str) -> None:
        """Record an undecodable file; the warning names it once per run."""
        if path not in self.skipped:
            self.skipped[path] = reason
            log.warning("skipping %s: cannot decode it (%s)", path, reason)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        return cls(epoch=d["epoch"], progress=EpochProgress(**d["progress"]), best_acc=d["best_acc"],
                   best_epoch=d["best_epoch"], best_metrics=d["best_metrics"], best_meta=d.get("best_meta"),
                   history=[EpochRecord(**r) for r in d["history"]], skipped=dict(d["skipped"]),
                   elapsed=d.get("elapsed", 0.0))


# ---------------------------------------------------------------------------------------------
# The state file: tensors "model.*" (what trains), "extra.*" (a strategy's own, e.g. the best head),
# "optim.<param index>.<name>", "rng.torch"; JSON: the optimizer's param groups and `meta`.

def write_run_state(path: str | os.PathLike[str], *, model: StateDict, extra: StateDict,
                    optimizer: torch.optim.Optimizer, meta: dict[str, Any]) -> Path:
    """Model tensors (all, or only those that train), `extra` tensors, optimizer state, the torch
    RNG and `meta` (JSON: epoch, scheduler state, history...), written atomically as one file."""
    tensors = {f"model.{k}": v for k, v in model.items()} | {f"extra.{k}": v for k, v in extra.items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    return write_tagged(path, tensors, {"format": STATE_FORMAT, "optimizer_param_groups": opt["param_groups"], **meta})


@dataclass
class SavedRun:
    """A run state as read back: its tensors by kind, and its JSON."""

    tensors: StateDict
    meta: dict[str, Any]

    def part(self, prefix: str) -> StateDict:
        """The tensors saved under `prefix` ("model" or "extra"), without it."""
        return {k[len(prefix) + 1:]: v for k, v in self.tensors.items() if k.startswith(prefix + ".")}

    @property
    def state(self) -> RunState:
        return RunState.from_dict(self.meta["state"])

    def restore_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The optimizer's state, then the torch RNG as it was when the state was saved."""
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in self.tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": self.meta["optimizer_param_groups"]})
        if "rng.torch" in self.tensors:
            torch.set_rng_state(self.tensors["rng.torch"])


def read_run_state(path: str | os.PathLike[str], *, tensors: bool = True) -> SavedRun:
    """A run state (no tensors with `tensors=False`, for the JSON alone); FileNotFoundError /
    ValueError with the fix."""
    found, meta = read_tagged(Path(path), STATE_FORMAT, "run state",
                              "Pass the folder of a run started by `headstart train` (it writes "
                              "state.safetensors after every epoch)", tensors=tensors)
    return SavedRun(found, meta)


# ---------------------------------------------------------------------------------------------
# Interrupts.

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
    """Another rank of a data-parallel run died or stopped answering (distributed.py): this one
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
