"""Training: the options, the epoch loop, and the whole run.

Read top to bottom: `TrainConfig` (every option, declared once; the command line derives its flags
from these fields), `Callback` (what a person watches), `fit` (the epoch loop, the same for every
strategy in strategies.py: train, validate, record, keep the best, save the state), and `train`
(the one call behind `headstart train`: dataset -> model -> fit -> the run folder's files).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .check import unreadable_files
from . import confidence
from .callbacks import Callback, EarlyStopping, Run, StopAtBudget
from .checkpoint import RunCheckpoints, add_to_checkpoint
from .clock import Clock, Estimate, parse_duration
from .data import Columns, DatasetSplits, scan_dataset
from .download import writable_cache
from .features import Features
from .distributed import SINGLE, Group, is_rank_failure, join
from .inference import Inference, infer
from .limits import ModelLimits, fit_limits
from .metrics import Metrics, compute_metrics
from .models import create_model, get_model_info
from .preprocessing import Preprocessing
from .runfolder import (check_dataset_unchanged, claim_run_folder, clear_temporaries, write_dataset_listing,
                        write_metrics_csv, write_run_files, write_summary)
from .runstate import (STATE_FILE, EpochProgress, EpochRecord, RankLost, RunState, StopOnSignal, StopRequested,
                       TrainingDiverged, TrainingInterrupted,
                       read_run_state, write_run_state)
from .runtime import ENGINES, PRECISIONS, Runtime, resolve_runtime
from .strategies import STRATEGIES, Stepper, Strategy, choose_backbone, get_strategy

SCHEDULES = ("constant", "cosine")
FEATURE_CACHES = ("off", "memory", "disk")
BAD_FILES = ("skip", "fail")

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The options.

def option(default: Any, help: str | Callable[[], str], *, choices: Iterable[str] | None = None,
           minimum: float | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A TrainConfig field with what the command line and the checks need: help text (or a function
    that writes it from the registries), the valid choices (a live container: the strategy
    registry), the smallest valid value, and `parse` for a value written as text (a duration)."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "parse": parse})


def parse_sizes(text: str) -> tuple[int, ...]:
    """'128,176' -> (128, 176); '' or 'none' -> ()."""
    if str(text).strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        sizes = ()
    if not sizes or not all(8 <= x <= 2048 for x in sizes):
        raise ValueError(f"train sizes {text!r} are not crop sizes like 128,176 (each from 8 to 2048)")
    return sizes


AUTO_PATIENCE = 2  # the default run's (auto's) --patience; an explicit strategy trains its --epochs unless given one


def parse_patience(text: str) -> int | None:
    """'3' -> 3; 'off' -> 0 (every epoch trains)."""
    if str(text).strip().lower() == "off":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"patience {text!r} is not a number of epochs (e.g. 2) or off") from None


def _strategy_help() -> str:
    return "; ".join(f"{s.name}: {s.description}" for s in STRATEGIES.values())


def _momentum_help() -> str:
    return "SGD momentum (default: " + ", ".join(f"{s.momentum} for {s.name}" for s in STRATEGIES.values()) + ")"


@dataclass
class TrainConfig:
    """Everything that defines a run; saved into every checkpoint. Defaults are the tutorial's."""

    arch: str = option("resnet50", "backbone name; see `headstart models`; auto: the one whose features a head fits "
                                   "best, of those with ImageNet weights here")
    weights: str | None = option(
        "imagenet", "'imagenet' (or another tag of the backbone), a checkpoint, a weights file or its http(s) URL "
        "(.safetensors, .pth, MindSpore .ckpt, TF.js model.json; a head with as many classes as DATA is kept), or "
        "'none' (random initialisation)")
    strategy: str = option("auto", _strategy_help, choices=STRATEGIES)
    train_from: str | None = option(None, "partial, gradual: the first stage that trains, e.g. layer3 of a ResNet "
                                          "(`headstart models` lists each backbone's; default: the last)")
    backbone_lr: float = option(0.1, "gradual, auto: the backbone's learning rate as a multiple of --lr", minimum=0)
    budget: float | None = option(None, "the time the whole run may take, e.g. 90s, 5m, 1h30m: auto plans for it; "
                                        "every strategy stops before an epoch that would end after it "
                                        "(default: none)", parse=parse_duration)
    epochs: int = option(10, "training epochs", minimum=1)
    batch_size: int = option(18, "training images per step", minimum=1)
    lr: float = option(0.001, "learning rate")
    momentum: float | None = option(None, _momentum_help, minimum=0)
    weight_decay: float = option(0.0, "SGD weight decay", minimum=0)
    schedule: str = option("constant", "learning-rate schedule: constant, or cosine per step down to 1% of lr",
                           choices=SCHEDULES)
    image_size: int | None = option(None, "crop size (default: the backbone's, 224 for the ResNets)", minimum=8)
    train_size: int | None = option(None, "crop size of the training steps (default: --image-size); e.g. 160 or 176 "
                                          "with evaluation at 224: a step then costs about (160/224)^2 of one at 224",
                                    minimum=8)
    train_sizes: tuple[int, ...] = option((), "progressive resizing: the crop sizes of the first epochs, one each "
                                                 "(e.g. 128,176), before --train-size (or --image-size) for the rest; "
                                                 "none: every epoch at one size", parse=parse_sizes)
    warmup: float = option(0.0, "epochs of linear learning-rate warm-up from 1% of --lr at the start of training "
                                "(e.g. 0.5)", minimum=0)
    patience: int | None = option(None, "stop after this many epochs in which validation did not improve (its loss "
                                        "2% lower, or its accuracy higher by more than its noise on the split's "
                                        "size; --epochs stays the most); off (0): train every epoch (default: "
                                        f"{AUTO_PATIENCE} for auto, off for the other strategies)", minimum=0,
                                  parse=parse_patience)
    val_split: float | None = option(None, "for a folder of class folders without train/ and val/ (or a table "
                                           "without a split column): the fraction "
                                           "held out for validation, e.g. 0.2 (seeded, stratified)")
    path_column: str | None = option(None, "DATA is a table (.csv, .tsv): its column of image paths, relative to the "
                                           "table's folder or absolute (default: the column headed path, file, image "
                                           "or filename)")
    label_column: str | None = option(None, "DATA is a table: its column of labels (default: the column headed "
                                            "label, class or category)")
    allow_outside: bool = option(False, "DATA is a table: let a relative path leave the table's folder (..)")
    seed: int = option(0, "seed of the new head, the augmentation and the order of the images")
    workers: int = option(2, "data-loading worker processes", minimum=0)
    precision: str = option("auto", "auto: bf16 where the CPU or GPU supports it, else fp32; int8: the frozen "
                                    "backbone's features (and predict's model) quantized by NNCF, run by OpenVINO",
                            choices=PRECISIONS)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = option(None, "compute threads (default: one per core)", minimum=1)
    compile: bool = option(False, "torch.compile the network (the first call costs 25-100 s on a CPU)")
    engine: str = option("auto", "what runs inference (validation, frozen features, prediction, evaluation); auto: "
                                 "OpenVINO on a CPU where installed (validation during fine-tuning: from 256 images, "
                                 "which pay back its conversion)", choices=ENGINES)
    feature_cache: str = option("disk", "frozen strategy: compute backbone features once and train the head on them, "
                                        "kept in memory or also on disk for later runs; off runs the backbone every "
                                        "step", choices=FEATURE_CACHES)
    views: int = option(0, "frozen with a feature cache: augmented views per image besides the plain one", minimum=0)
    save_every: float | None = option(300.0, "save the run state mid-epoch too, this often (e.g. 90s, 5m): a kill "
                                             "then loses at most this much training", parse=parse_duration)
    bad_files: str = option("skip", "files that cannot be read as images: skip them (each named once) or stop "
                                    "before training", choices=BAD_FILES)
    balance: bool = option(False, "weight the loss by inverse class frequency (for imbalanced classes)")
    sync_batchnorm: bool = option(False, "data-parallel runs: the BatchNorm layers that train use the statistics of "
                                         "the whole global batch, so the run gives one process's results (else each "
                                         "rank's own share, DDP's default: faster, no exchange per layer)")
    timeout: float = option(300.0, "data-parallel runs (torchrun, --nproc): how long a rank waits for the others "
                                   "(e.g. 90s, 10m) before it ends the run with an error", minimum=1,
                            parse=parse_duration)

    def columns(self) -> Columns:
        """How DATA is read where it is a table of labels."""
        return Columns(self.path_column, self.label_column, self.allow_outside)

    def __post_init__(self) -> None:
        if self.weights == "none":
            self.weights = None
        if isinstance(self.train_sizes, list):  # (from a run state's JSON)
            self.train_sizes = tuple(self.train_sizes)
        for f in fields(self):
            if f.metadata["parse"] is not None and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, f.metadata["parse"](getattr(self, f.name)))
            value, choices, minimum = getattr(self, f.name), f.metadata["choices"], f.metadata["minimum"]
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} {value!r} is not one of {', '.join(choices)}")
            if minimum is not None and value is not None and value < minimum:
                raise ValueError(f"{f.name} must be at least {minimum}, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.momentum is None:
            self.momentum = STRATEGIES[self.strategy].momentum
        if self.precision == "int8" and (self.strategy in ("finetune", "partial") or self.feature_cache == "off"):
            raise ValueError(f"precision int8 is for the frozen backbone's cached features, not strategy "
                             f"{self.strategy!r} with feature_cache {self.feature_cache!r}: use it with the frozen, "
                             "gradual or auto strategy and a feature cache (what trains runs in bf16 or fp32)")
        if self.arch == "auto" and self.weights != "imagenet":
            raise ValueError(f"arch 'auto' chooses among backbones with ImageNet weights; drop weights={self.weights!r} "
                             "(--weights) or name the backbone (--arch)")


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
    In a data-parallel run (`runtime.group`, distributed.py) every rank calls this; rank 0 alone
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
        books.keep(strategy, stepper, group.world if parallel else 1)
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
        strategy.finish(books.checkpoints)  # the pictures and the caller get the best epoch's model
    return _result(out, state, books, clock, strategy, stopped=run.stopped)


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
    """fit's bookkeeping: where the run stands (its RunState), its checkpoints, the run state file
    and metrics.csv, written at each epoch's end (and, within an epoch, every `save_every` s)."""

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
        if (out / STATE_FILE).exists() and (state.epoch or state.progress.steps):
            self.saved_at_where = _where(state)

    def keep(self, strategy: Strategy, stepper: Stepper, ranks: int) -> None:
        self.strategy, self.stepper, self.ranks = strategy, stepper, ranks

    def save_state(self) -> None:
        self.state.elapsed = time.perf_counter() - self.clock.started
        if self.writes:
            tensors, extra, meta = self.strategy.run_state()
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
            self.strategy.on_best(self.checkpoints, meta)
        state.epoch, state.progress = epoch, EpochProgress()
        state.history.append(record)
        self.save_state()
        if self.writes:
            write_metrics_csv(self.out / "metrics.csv", state.history)
        self.clock.on_epoch_end(record)

    def close(self) -> None:
        """The latest weights, and what the strategy keeps in memory (at the end, or an interrupt)."""
        last = asdict(self.state.history[-1]) if self.state.history else None
        self.checkpoints.write("last", epoch=self.state.epoch, metrics=last)
        self.strategy.save(self.checkpoints)


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


# ---------------------------------------------------------------------------------------------
# The whole run.

def train(data: str | os.PathLike[str], *, out: str | os.PathLike[str], config: TrainConfig | None = None,
          callback: Callback | None = None, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train a classifier on a class-per-folder dataset; everything goes into `out` (see
    runfolder.py): best/last checkpoints (.safetensors + .json), metrics.csv, summary.json, the
    pictures, report.html, and state.safetensors (what `resume=True` continues from). A folder
    that holds another run is refused unless `overwrite`; see runfolder.claim_run_folder.
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    writable_cache()  # the features, graphs and kernels go there: a folder that cannot take them is said now
    group = join(timeout=config.timeout, device=config.device)  # one process alone, or a rank of torchrun's
    out = group.broadcast(out)  # rank 0's (a default folder is chosen by what exists when each rank looks)
    held = claim_run_folder(Path(out), data=data, resume=resume, overwrite=overwrite) if group.main else \
        contextlib.nullcontext()
    with held:
        result = _train(data, Path(out), config, callback or Callback(), resume, started, group)
    group.leave()  # (rank 0 still writes its files alone when the others leave: no collective is waited for)
    return result


def _train(data: str | os.PathLike[str], out: Path, config: TrainConfig, callback: Callback, resume: bool,
           started: float, group: Group) -> RunResult:
    splits = scan_dataset(data, val_split=config.val_split, seed=config.seed, columns=config.columns())
    if resume and group.main:
        check_dataset_unchanged(out, splits)
    elif group.main:
        write_dataset_listing(out, splits)
    bad = _drop_unreadable(splits, fail=config.bad_files == "fail")
    if group.active:  # every rank must read the same images in the same order
        seen = group.gather((splits.classes, [str(s.path) for s in splits.train], [str(s.path) for s in splits.val]))
        if any(other != seen[0] for other in seen[1:]):
            differ = [r for r, other in enumerate(seen) if other != seen[0]]
            raise ValueError(f"rank(s) {differ} see other files in {data} than rank 0 (classes, or the readable "
                             "images of a split): every rank needs the same dataset at the same path")
    strategy = get_strategy(config.strategy)
    runtime = resolve_runtime(device=config.device, precision=config.precision, threads=config.threads,
                              compile=config.compile and strategy.compiles, engine=config.engine, group=group)
    chose_arch: dict[str, Any] = {}
    if config.arch == "auto":  # the backbone whose features a head fits best; the run then reads them back
        arch, scores = choose_backbone(splits, config=config, runtime=runtime, callback=callback)
        config, chose_arch = replace(config, arch=arch), {"backbone_choice": scores}
    info = get_model_info(config.arch)
    pre = info.preprocessing.with_sizes(config.image_size, config.train_size)
    if resume and strategy.holds_weights:  # every weight comes from the run state
        arch_kwargs = group.broadcast(read_run_state(out / STATE_FILE, tensors=False).meta.get("arch_kwargs", {})
                                      if group.main else None)
        model = create_model(config.arch, num_classes=len(splits.classes), **arch_kwargs)
    else:
        torch.manual_seed(config.seed)  # the new head's initialisation
        model = create_model(config.arch, num_classes=len(splits.classes), weights=config.weights)
    counts = splits.counts()
    callback.on_start({"classes": splits.classes, "counts": counts, "runtime": runtime.describe(),
                       "config": asdict(config), "out": str(out)})
    result = fit(model, splits, config=config, preprocessing=pre, runtime=runtime, out=out, callback=callback,
                 callbacks=stopping_callbacks(config), resume=resume,
                 run_meta={"data": str(Path(data).resolve()), "arch_kwargs": model.arch_kwargs},
                 skipped=bad, started=started)
    result.training_time = time.perf_counter() - started  # (to the last epoch's end; the run's files follow)
    if not group.main:  # rank 0 writes the run's files
        return result
    # The best model on the validation set (computed again after a resume): pictures, summary, report.
    inf = result.val_inference or infer(model, splits.val, runtime=runtime, pre=pre, workers=config.workers)
    # Its limits: temperature and unknown-image test fitted on validation, kept in best.safetensors.
    alone = replace(runtime, group=SINGLE)  # (rank 0 alone from here)
    try:
        result.limits = fit_limits(model, splits, runtime=alone, pre=pre, workers=config.workers)
    except KeyboardInterrupt:  # every epoch is saved: a resume fits them again
        raise TrainingInterrupted(out, result.best_epoch, 0, while_="fitting the temperature and the unknown-image "
                                                                    "test (every epoch is saved)") from None
    if result.limits is not None:
        lim, rej = result.limits, result.limits.rejection
        add_to_checkpoint(result.best_checkpoint, tensors={confidence.REFERENCE: lim.reference} if rej else None,
                          **lim.checkpoint_meta())
        test = (f"unknown below familiarity {rej.threshold:g} ({rej.false_rejection:.1%} of validation images)" if rej
                else f"no unknown-image test (fewer than {confidence.MIN_VALIDATION} validation images)")
        callback.on_message(f"calibration: {lim.line()}; {test}")
    summary = {
        "data": str(data), "out": str(out), "classes": splits.classes, "counts": counts,
        "config": asdict(config), "runtime": runtime.describe(),
        "best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
        "best_metrics": result.best_metrics.to_dict(), "history": [asdict(r) for r in result.history],
        "skipped_files": result.skipped, "stopped": result.stopped, "training_s": result.training_time,
        "wall_time_s": time.perf_counter() - started,  # (rewritten at the end, with the pictures and the report)
        "estimate": asdict(result.estimate) if result.estimate else None, **result.chosen, **chose_arch,
        **(result.limits.summary() if result.limits else {}),
        "checkpoints": {"best": str(result.best_checkpoint), "last": str(result.last_checkpoint)},
    }
    try:
        result.files.update(write_run_files(out, inf=inf, splits=splits, pre=pre, history=result.history,
                                            summary=summary, features=result.features, limits=result.limits))
    except KeyboardInterrupt:  # the model and the run state are saved: a resume draws them again
        raise TrainingInterrupted(out, result.best_epoch, 0, while_="writing the pictures, summary.json and the "
                                                                    "report (every epoch is saved)") from None
    result.wall_time = summary["wall_time_s"] = time.perf_counter() - started  # the whole run
    write_summary(out, summary)
    return result


def _drop_unreadable(splits: DatasetSplits, *, fail: bool) -> dict[str, str]:
    """{path: reason} of the files that cannot be read, taken out of `splits`: every file's header
    (the check's fast part); with `fail`, every file decoded in full, and a ValueError listing them."""
    bad = unreadable_files((s.path for s in splits.train + splits.val), full=fail)
    if bad and fail:
        listing = "\n  ".join(f"{p}: {r}" for p, r in bad.items())
        raise ValueError(f"{len(bad)} file(s) cannot be read as images (bad_files='fail'):\n  {listing}\n"
                         "remove them, or let training skip them (--bad-files skip)")
    for path, reason in bad.items():
        log.warning("skipping %s: %s", path, reason)
    splits.train = [s for s in splits.train if str(s.path) not in bad]
    splits.val = [s for s in splits.val if str(s.path) not in bad]
    return bad


RESUME_OPTIONS = ("epochs", "budget", "workers", "threads", "timeout")  # what may change when a run resumes


def resume(run: str | os.PathLike[str], *, callback: Callback | None = None, **changes: Any) -> RunResult:
    """Continue the run in folder `run` from its last saved state, with its own data and config;
    `changes` may give it more epochs (or another budget, workers, threads: RESUME_OPTIONS). Any
    other option defines the run, and changing it is refused (ValueError naming the ones that may)."""
    state = Path(run) / STATE_FILE
    group = join(timeout=parse_duration(changes.get("timeout", TrainConfig.timeout)))
    if group.main and not state.exists() and Path(run).is_dir():
        raise FileNotFoundError(f"{run} has no run state (state.safetensors) to resume: the run stopped before it "
                                "first saved one. Start it again, without --resume")
    meta = group.broadcast(read_run_state(state, tensors=False).meta if group.main else None)  # rank 0's
    refused = sorted(set(changes) - set(RESUME_OPTIONS))
    if refused:
        flags = ", ".join("--" + n.replace("_", "-") for n in refused)
        raise ValueError(f"{flags} cannot change when a run resumes: they define the run {run}. What can: "
                         f"{', '.join('--' + n for n in RESUME_OPTIONS)}; start a new run for the rest")
    try:
        config = TrainConfig(**{**meta["config"], **changes})
        data = meta["data"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{state} lacks what a resume needs ({type(e).__name__}: {e}); it was not written by this "
                         "headstart's `train`. Start a new run") from None
    done = RunState.from_dict(meta["state"]).epoch if "state" in meta else 0
    if config.epochs < done:
        raise ValueError(f"--epochs {config.epochs} is fewer than the {done} epochs the run {run} has done already")
    return train(data, out=run, config=config, callback=callback, resume=True)
