"""The epoch loop, the same for every strategy (strategies/): train, validate, record, keep the best,
save the run state. The loop writes every file of a run's training: best and last checkpoints
(a strategy says which tensors, `Strategy.best_tensors` and `trained_part`), the run state
(state.safetensors) and metrics.csv; io/runfolder.py and io/runstate.py say what they hold."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from headstart.analysis.limits import ModelLimits
from headstart.analysis.metrics import Metrics, compute_metrics
from headstart.data import DatasetSplits
from headstart.data.transforms import Preprocessing
from headstart.io.checkpoint import RunCheckpoints
from headstart.io.formats.safetensors import StateDict
from headstart.io.runfolder import clear_temporaries, write_metrics_csv
from headstart.io.runstate import (STATE_FILE, EpochProgress, EpochRecord, RunState, SavedRun, read_run_state,
                                   write_run_state)
from headstart.runtime.clock import Clock, Estimate
from headstart.runtime.device import Runtime
from headstart.runtime.distributed import SINGLE, is_rank_failure
from headstart.runtime.features import Features
from headstart.runtime.inference import Inference
from headstart.training.callbacks import Callback, EarlyStopping, Run, StopAtBudget
from headstart.training.config import AUTO_PATIENCE, TrainConfig
from headstart.training.interrupts import RankLost, StopOnSignal, StopRequested, TrainingDiverged, TrainingInterrupted
from headstart.training.optim import Stepper
from headstart.training.registry import get_strategy
from headstart.training.strategies import Strategy


@dataclass
class RunResult:
    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_acc: float
    history: list[EpochRecord]
    best_metrics: Metrics | None  # None on a rank of a data-parallel run that left the training to rank 0
    skipped: dict[str, str]  # path -> reason, files that could not be decoded
    files: dict[str, Path] = field(default_factory=dict)
    wall_time: float = 0.0  # the whole run: training, then calibration, the label check, pictures and report
    training_time: float = 0.0  # to the end of the last epoch
    val_inference: Inference | None = None  # the best epoch's validation logits (None after a resume)
    estimate: Estimate | None = None  # said after the first few steps of this process
    chosen: dict[str, Any] = field(default_factory=dict)  # what the strategy chose, and why (auto's plan)
    features: tuple[Features, Features] | None = None  # (train, val) of the pretrained backbone, where computed
    limits: ModelLimits | None = None  # temperature and unknown-image test, fitted on validation after training
    stopped: str | None = None  # why the run ended before its last epoch (callbacks.EarlyStopping, StopAtBudget)


# ---------------------------------------------------------------------------------------------
# The epoch loop.

def fit(model: nn.Module, splits: DatasetSplits, *, config: TrainConfig, preprocessing: Preprocessing,
        runtime: Runtime, out: Path, callback: Callback | None = None, callbacks: Sequence[Callback] = (),
        resume: bool = False, run_meta: dict[str, Any] | None = None, skipped: dict[str, str] | None = None,
        started: float | None = None) -> RunResult:
    """Train `model` on `splits` with `config.strategy`. After each epoch (epoch 0 included, where
    the strategy starts from a result of its own): validate, write a row of metrics.csv and the run
    state that `resume=True` continues from (bit-identical to an uninterrupted run on the CPU); the
    best epoch's checkpoint as the strategy keeps it, the last at the end (or at an interrupt).
    `started`: when the run began (perf_counter), for the estimate and `config.budget`. After each
    epoch's validation, `callbacks` (and `callback`) see the run and may stop it (callbacks.py):
    `stopping_callbacks(config)` are those the config asks for (patience, budget).
    In a data-parallel run (`runtime.group`, runtime/distributed.py) every rank calls this; rank 0 alone
    reads and writes `out`."""
    group = runtime.group
    if group.main:
        out.mkdir(parents=True, exist_ok=True)
        clear_temporaries(out)
    saved = group.broadcast(read_run_state(out / STATE_FILE) if resume and group.main else None)
    state = saved.state if saved else RunState()
    state.skipped = {**(skipped or {}), **state.skipped}
    clock = Clock(callback or Callback(), started=(started or time.perf_counter()) - state.elapsed)
    books = _Books(out, model, splits, config, preprocessing, state, clock, run_meta or {}, writes=group.main)
    with StopOnSignal() as stop, contextlib.ExitStack() as ending:
        strategy = get_strategy(config.strategy).build(model, splits, config=config, preprocessing=preprocessing,
                                                       runtime=runtime, callback=clock, skip=state.skip,
                                                       started=clock.started, stop=stop)
        ending.callback(strategy.close)  # its data workers end with the epochs (or once an error is dropped)
        refuse_old_hooks(strategy, config.strategy)
        try:
            baseline = strategy.start(saved)  # its tensors from the run state; else features, epoch 0, a plan
        except StopRequested:
            raise TrainingInterrupted(out, state.epoch, 0, while_="the strategy prepared (features, the head fitted "
                                                                  "on them, its plan)") from None
        parallel = group.active and strategy.distribute()
        if group.active and not parallel and not group.main:
            return _result(out, state, books, clock, strategy)  # rank 0 trains alone from here
        stepper = Stepper.build(strategy.parameters(), config, strategy.epochs * strategy.steps_per_epoch, runtime,
                                steps_per_epoch=strategy.steps_per_epoch)
        books.keep(strategy, stepper, group.world if parallel else 1, saved)
        if saved:
            stepper.restore(saved)  # the optimizer, schedule, scaler, and the torch RNG: nothing draws from it after
            step = f", step {state.progress.steps} of epoch {state.epoch + 1}" if state.progress.steps else ""
            clock.on_message(f"resuming {out} after epoch {state.epoch}{step}")
        clock.watch(strategy, patience=next((c.patience for c in callbacks if isinstance(c, EarlyStopping)), 0),
                    first_epoch=state.history[0].epoch if state.history else 0 if baseline is not None else 1)
        ranks = group if parallel else SINGLE  # the ranks that train the epochs together
        run = Run(model, config, splits, state.history, strategy.epochs, clock.started)

        def verdict() -> None:  # the callbacks, after an epoch's validation: go on, or stop (rank 0 decides)
            for cb in (clock, *callbacks):
                cb.on_validation_end(run)
            run.stopped = ranks.broadcast(run.stopped)
            if run.stopped:
                clock.on_message(f"stopping after epoch {run.epoch}: {run.stopped}")

        if baseline is not None:
            books.end_epoch(0, *baseline, seconds=time.perf_counter() - clock.started, lr=stepper.lr)
        if state.history:  # after epoch 0, or (resumed) after the last epoch saved: decided as it was then
            verdict()
        try:
            for epoch in range(state.epoch + 1, strategy.epochs + 1):
                if run.stopped:
                    break
                started_epoch, lr = time.perf_counter() - state.progress.seconds, stepper.lr
                progress = strategy.train_epoch(epoch, stepper, progress=state.progress,
                                                stop=lambda: stop() or books.save_if_due())
                if progress.interrupted:
                    progress.interrupted, state.progress = False, progress
                    books.save_state()
                    books.close()
                    raise TrainingInterrupted(out, epoch, progress.steps)
                inf = strategy.validate(epoch)
                for found in ranks.gather(dict(state.skipped))[1:]:  # files that failed on the other ranks
                    for path, reason in found.items():
                        state.skip(path, reason)
                books.end_epoch(epoch, progress, inf, time.perf_counter() - started_epoch, lr)
                verdict()
                if ranks.any(stop()) and epoch < strategy.epochs and not run.stopped:
                    books.close()
                    raise TrainingInterrupted(out, epoch, strategy.steps_per_epoch)
        except RuntimeError as e:
            if not (ranks.active and is_rank_failure(e)):
                raise
            raise RankLost(out, group.rank, group.world, str(e), books.saved_at_where, main=group.main) from None
    books.close()
    if group.main:
        books.load_best()  # the pictures and the caller get the best epoch's model
    return _result(out, state, books, clock, strategy, stopped=run.stopped)


OLD_HOOKS = ("on_best", "save", "finish")  # a strategy's until 0.1: the loop writes every checkpoint now


def refuse_old_hooks(strategy: Strategy, name: str) -> None:
    """TypeError for a strategy written for the old protocol, whose checkpoint hooks the loop would
    silently skip: it says what replaces them."""
    old = [hook for hook in OLD_HOOKS if hasattr(strategy, hook)]
    if old:
        raise TypeError(f"strategy {name!r} ({type(strategy).__name__}) defines {', '.join(old)}: the loop writes "
                        "every checkpoint now (training/loop.py). Return the tensors a best epoch keeps from "
                        "best_tensors(epoch), set trained_part where only part of the model trains, and drop them")


def _result(out: Path, state: RunState, books: "_Books", clock: Clock, strategy: Strategy,
            stopped: str | None = None) -> RunResult:
    return RunResult(out=out, best_checkpoint=out / "best.safetensors", last_checkpoint=out / "last.safetensors",
                     best_epoch=state.best_epoch, best_val_acc=state.best_acc, history=state.history,
                     best_metrics=Metrics.from_dict(state.best_metrics) if state.best_metrics else None,
                     skipped=state.skipped,
                     files={"metrics": out / "metrics.csv", "state": out / STATE_FILE},
                     val_inference=books.best_val, estimate=clock.estimate, chosen=strategy.chosen(),
                     features=strategy.features, stopped=stopped)


def stopping_callbacks(config: TrainConfig) -> list[Callback]:
    """The callbacks that stop a run, as `config` asks: EarlyStopping (`patience`), StopAtBudget (`budget`)."""
    patience = config.patience if config.patience is not None else AUTO_PATIENCE if config.strategy == "auto" else 0
    return ([EarlyStopping(patience)] if patience else []) + \
        ([StopAtBudget(config.budget)] if config.budget is not None else [])


class _Books:
    """fit's bookkeeping: where the run stands (its RunState), and every file the loop writes: the
    best checkpoint (at a new best; where the strategy trains a part, that part kept in memory and
    written at the end), the last (at the end, or an interrupt), the run state file and metrics.csv
    (at each epoch's end and, within an epoch, every `save_every` s)."""

    def __init__(self, out: Path, model: nn.Module, splits: DatasetSplits, config: TrainConfig,
                 preprocessing: Preprocessing, state: RunState, clock: Clock, run_meta: dict[str, Any], *,
                 writes: bool = True) -> None:
        self.out, self.splits, self.config = out, splits, config
        self.pre, self.state, self.clock, self.run_meta = preprocessing, state, clock, run_meta
        self.writes = writes  # False on the ranks of a data-parallel run but rank 0: they keep the books unwritten
        self.checkpoints = RunCheckpoints(out, model, classes=splits.classes, preprocessing=preprocessing,
                                          meta={"config": asdict(config), "counts": splits.counts()}, writes=writes)
        self.best_val: Inference | None = None  # the best epoch's validation logits, for the pictures
        self.saved_at = time.perf_counter()
        self.saved_at_where: str | None = None  # where the run state on disk stands (for RankLost's message)
        self.part: str | None = None  # the strategy's trained_part (set by `keep`)
        self.best: StateDict = {}  # where a part trains: the best epoch's part, by state-dict key
        self.best_meta: dict[str, Any] = {}
        if (out / STATE_FILE).exists() and (state.epoch or state.progress.steps):
            self.saved_at_where = _where(state)

    def keep(self, strategy: Strategy, stepper: Stepper, ranks: int, saved: SavedRun | None) -> None:
        self.strategy, self.stepper, self.ranks = strategy, stepper, ranks
        self.part = strategy.trained_part
        if self.part and saved is not None:
            self.best = {k[len("best."):]: v for k, v in saved.part("extra").items() if k.startswith("best.")}
            self.best_meta = saved.state.best_meta or {}

    def save_state(self) -> None:
        self.state.elapsed = time.perf_counter() - self.clock.started
        if self.writes:
            tensors, extra, meta = self.strategy.run_state()
            extra = {**extra, **{f"best.{k}": v for k, v in self.best.items()}}
            write_run_state(self.out / STATE_FILE, model=tensors, extra=extra, optimizer=self.stepper.optimizer,
                            meta={**self.run_meta, "config": asdict(self.config), **self.stepper.state_meta(),
                                  "state": self.state.to_dict(), **meta})
            self.saved_at_where = _where(self.state)
        self.saved_at = time.perf_counter()

    def save_if_due(self) -> bool:
        """After a step: the run state saved mid-epoch if `save_every` s have gone by since the last
        (state.progress is the epoch's live progress), so that a kill costs at most that much training.
        Returns False: not a reason to stop."""
        if self.config.save_every and time.perf_counter() - self.saved_at > self.config.save_every:
            self.save_state()
        return False

    def end_epoch(self, epoch: int, progress: EpochProgress, inf: Inference, seconds: float, lr: float) -> None:
        state = self.state
        metrics = compute_metrics(inf.outputs, inf.labels, self.splits.classes)
        if not math.isfinite(metrics.loss) and metrics.n:
            raise TrainingDiverged(epoch, None, metrics.loss, lr, self.pre.train_crop)
        record = _record(epoch, self.strategy.epochs, progress, metrics, seconds, lr,
                         time.perf_counter() - self.clock.started, ranks=self.ranks, batch=self.config.batch_size)
        if metrics.accuracy > state.best_acc:
            meta = {"epoch": epoch, "metrics": asdict(record)}
            state.best_acc, state.best_epoch, state.best_metrics = metrics.accuracy, epoch, metrics.to_dict()
            state.best_meta, self.best_val = {**self.checkpoints.meta, **meta}, inf
            self.new_best(epoch, meta)
        state.epoch, state.progress = epoch, EpochProgress()
        state.history.append(record)
        self.save_state()
        if self.writes:
            write_metrics_csv(self.out / "metrics.csv", state.history)
        self.clock.on_epoch_end(record)

    def new_best(self, epoch: int, meta: dict[str, Any]) -> None:
        tensors = self.strategy.best_tensors(epoch)
        if self.part is None:
            self.checkpoints.write("best", tensors=tensors, **meta)
            return
        tensors = self.checkpoints.model.state_dict() if tensors is None else tensors
        self.best = {k: v.detach().clone() for k, v in tensors.items() if k.startswith(self.part)}
        self.best_meta = meta

    def close(self) -> None:
        """The latest weights, and the best part kept in memory (at the end, or an interrupt)."""
        last = asdict(self.state.history[-1]) if self.state.history else None
        self.checkpoints.write("last", epoch=self.state.epoch, metrics=last)
        if self.best:
            self.checkpoints.write("best", tensors={**self.checkpoints.model.state_dict(), **self.best},
                                   **self.best_meta)

    def load_best(self) -> None:
        """After the last epoch: the model gets the best epoch's weights."""
        model = self.checkpoints.model
        if self.part is not None:
            model.load_state_dict(self.best, strict=False)
        else:
            model.load_state_dict(self.checkpoints.read("best"))


def _where(state: RunState) -> str:
    if state.progress.steps:
        return f"epoch {state.epoch + 1}, step {state.progress.steps}"
    return f"the end of epoch {state.epoch}"


def _record(epoch: int, epochs: int, progress: EpochProgress, metrics: Metrics, seconds: float,
            lr: float, elapsed: float, *, ranks: int, batch: int) -> EpochRecord:
    return EpochRecord(
        epoch=epoch, epochs=epochs, train_loss=progress.loss, train_acc=progress.accuracy,
        val_loss=metrics.loss, val_acc=metrics.accuracy, val_balanced_acc=metrics.balanced_accuracy,
        epoch_time=seconds, step_time=progress.seconds / max(progress.steps, 1),
        images_per_s=progress.images / max(progress.seconds, 1e-9),
        data_wait=progress.wait_seconds / max(progress.seconds, 1e-9), lr=lr, elapsed=elapsed, ranks=ranks,
        global_batch=batch)
