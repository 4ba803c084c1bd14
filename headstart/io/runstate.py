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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from headstart.io.checkpoint import STATE_FORMAT
from headstart.io.formats.safetensors import StateDict, read_tagged, write_tagged

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
    ranks: int = 1  # processes that trained it (data-parallel: runtime/distributed.py)
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
