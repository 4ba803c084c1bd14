"""Training: fine-tune the whole network, or train a new head on a frozen backbone.

Read top to bottom: the config, the small pieces (train mode, optimizer, one epoch), `fit` (the
epoch loop with checkpoints and metrics, written only in terms of those pieces), and `train` (the
one call behind `headstart train`: dataset -> model -> fit -> pictures and summary).

Strategies (the tutorial's two):
- finetune: every parameter trains; SGD momentum 0.9.
- frozen: only the head trains (SGD momentum 0.5); the backbone runs under no_grad in eval mode,
  so its BatchNorm statistics do not move and every backbone tensor stays bit-identical.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .check import unreadable_files
from .checkpoint import load_run_state, read_checkpoint_meta, restore_run_state, save_checkpoint, save_run_state
from .data import DatasetSplits, ImageDataset, collate, make_loader, sample_seed, scan_dataset
from .download import atomic_write
from .evaluation import Inference, Metrics, compute_metrics, run_inference
from .features import Features, extract_features, files_fingerprint
from .models import create_model, freeze_backbone, get_head, get_model_info
from .preprocessing import Preprocessing
from .report import write_report
from .runtime import Runtime, resolve_runtime
from .weights import weights_fingerprint

log = logging.getLogger(__name__)

STRATEGIES = ("finetune", "frozen")
DEFAULT_MOMENTUM = {"finetune": 0.9, "frozen": 0.5}
SCHEDULES = ("constant", "cosine")
FEATURE_CACHES = ("off", "memory", "disk")
BAD_FILES = ("skip", "fail")


# ---------------------------------------------------------------------------------------------
# Configuration and records.

@dataclass
class TrainConfig:
    """Everything that defines a run; saved into every checkpoint. Defaults are the tutorial's."""

    arch: str = "resnet50"
    weights: str | None = "imagenet"  # a tag of the model's sources, a file path, or None (random init)
    strategy: str = "finetune"
    epochs: int = 10
    batch_size: int = 18
    lr: float = 0.001
    momentum: float | None = None  # None: 0.9 for finetune, 0.5 for frozen
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine (per step, down to 1% of lr)
    image_size: int | None = None  # None: the model's own (224 for the ResNets)
    val_split: float | None = None  # for a folder without train/ and val/
    seed: int = 0
    workers: int = 2
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads (None: torch's default, one per core)
    compile: bool = False  # torch.compile (finetune only; the first step costs 25-100 s on a CPU)
    engine: str = "auto"  # inference (validation, features): auto | torch | openvino (see engine.py)
    feature_cache: str = "disk"  # frozen: off (backbone every step) | memory | disk (reused across runs)
    views: int = 0  # frozen with a feature cache: augmented views per image, besides the eval view
    bad_files: str = "skip"  # files whose header cannot be read: skip (named once) | fail (before training)
    balance: bool = False  # weight the loss by inverse class frequency (for imbalanced classes)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.feature_cache not in FEATURE_CACHES:
            raise ValueError(f"feature_cache {self.feature_cache!r} is not one of {FEATURE_CACHES}")
        if self.bad_files not in BAD_FILES:
            raise ValueError(f"bad_files {self.bad_files!r} is not one of {BAD_FILES}")
        if self.views < 0:
            raise ValueError(f"views must be 0 or more, got {self.views}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.momentum is None:
            self.momentum = DEFAULT_MOMENTUM[self.strategy]


@dataclass
class EpochRecord:
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

    def line(self) -> str:
        return (f"epoch {self.epoch}/{self.epochs}  train loss {self.train_loss:.4f}  val loss {self.val_loss:.4f}  "
                f"val acc {self.val_acc:.4f} (balanced {self.val_balanced_acc:.4f})  time {self.epoch_time:.1f}s  {self.step_time:.3f}s/step  "
                f"{self.images_per_s:.1f} img/s  data wait {self.data_wait:.0%}")


class Callback:
    """Hooks for progress display; every method is optional. The library itself never prints."""

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, phase: str, epoch: int, step: int, steps: int, loss: float | None) -> None: ...
    def on_epoch_end(self, record: EpochRecord) -> None: ...
    def on_skip(self, path: str, reason: str) -> None: ...
    def on_message(self, text: str) -> None: ...


@dataclass
class RunResult:
    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_acc: float
    history: list[EpochRecord]
    best_metrics: Metrics
    skipped: dict[str, str]  # path -> reason, files that could not be decoded
    files: dict[str, Path] = field(default_factory=dict)
    wall_time: float = 0.0
    val_inference: Inference | None = None  # the best epoch's validation logits (None after a resume)


# ---------------------------------------------------------------------------------------------
# Small pieces.

def set_train_mode(model: nn.Module, strategy: str, *, classifier: str = "fc") -> None:
    """finetune: everything in train mode. frozen: only the head; the backbone's BatchNorm layers
    stay in eval mode so their running statistics do not change."""
    if strategy == "finetune":
        model.train()
    else:
        model.eval()
        get_head(model, classifier).train()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum over the parameters that require grad (only the head's when frozen)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def class_weights(splits: DatasetSplits) -> torch.Tensor:
    """Inverse class frequency of the training split, normalised to mean 1: weight_c = N / (K * n_c)."""
    counts = torch.bincount(torch.tensor([s.label for s in splits.train]), minlength=len(splits.classes)).float()
    return counts.sum() / (len(counts) * counts.clamp(min=1))


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


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


def _sgd_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any,
              scaler: torch.amp.GradScaler | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    scheduler.step()


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, runtime: Runtime, pre: Preprocessing, *, strategy: str, epoch: int,
                    classifier: str = "fc", scaler: torch.amp.GradScaler | None = None,
                    callback: Callback | None = None, on_failed: Callable | None = None,
                    progress: EpochProgress | None = None, stop: Callable[[], bool] | None = None,
                    weight: torch.Tensor | None = None) -> EpochProgress:
    """One pass over `loader` (continuing `progress`); `weight`: per-class loss weights. Frozen: features under no_grad, gradient only
    through the head. Returns early, `interrupted`, when `stop()` turns true after a step.

    Cost per 224x224 image for ResNet50: finetune about 24 GFLOP (forward + backward), frozen about
    8.2 GFLOP (forward only).
    """
    set_train_mode(model, strategy, classifier=classifier)
    head = get_head(model, classifier)
    progress = progress or EpochProgress()
    start = time.perf_counter() - progress.seconds
    total = progress.steps + len(loader)
    it = iter(loader)
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        progress.wait_seconds += time.perf_counter() - t
        if batch is None:
            break
        if batch.failed and on_failed:
            on_failed(batch.failed)
        if not len(batch):
            continue
        x = runtime.inputs(batch.images, pre)  # (N, 3, S, S) float
        y = batch.labels.to(runtime.device)
        with runtime.autocast():
            if strategy == "frozen":
                with torch.no_grad():
                    features = model.forward_features(x)  # (N, F)
                logits = head(features)
            else:
                logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=weight)
        _sgd_step(loss, optimizer, scheduler, scaler)
        progress.add(float(loss.detach()), int((logits.argmax(1) == y).sum()), len(batch))
        if callback:
            callback.on_step("train", epoch, progress.steps, total, progress.loss_sum / progress.images)
        if stop and stop():
            progress.interrupted = True
            break
    progress.seconds = time.perf_counter() - start
    return progress


def train_head_one_epoch(head: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                         optimizer: torch.optim.Optimizer, scheduler: Any, *, batch_size: int, seed: int, epoch: int,
                         callback: Callback | None = None, progress: EpochProgress | None = None,
                         stop: Callable[[], bool] | None = None, weight: torch.Tensor | None = None) -> EpochProgress:
    """One pass of the head over cached features (N, F), shuffled by (seed, epoch), in fp32.

    Cost: 2*F*C FLOP per row forward, e.g. 8 kFLOP for ResNet50 features and 2 classes.
    """
    head.train()
    progress = progress or EpochProgress()
    start = time.perf_counter() - progress.seconds
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -2) % 2**63)
    batches = torch.randperm(len(labels), generator=g).to(features.device).split(batch_size)
    for rows in batches[progress.steps:]:
        logits = head(features[rows])
        loss = F.cross_entropy(logits, labels[rows], weight=weight)
        _sgd_step(loss, optimizer, scheduler, None)
        progress.add(float(loss.detach()), int((logits.argmax(1) == labels[rows]).sum()), len(rows))
        if callback:
            callback.on_step("train", epoch, progress.steps, len(batches), progress.loss_sum / progress.images)
        if stop and stop():
            progress.interrupted = True
            break
    progress.seconds = time.perf_counter() - start
    return progress


def cached_features(model: nn.Module, splits: DatasetSplits, *, config: TrainConfig, preprocessing: Preprocessing,
                    runtime: Runtime, fingerprint: str, callback: Callback) -> tuple[Features, Features]:
    """(train, val) features of the frozen backbone: train = eval view + `config.views` augmented views.
    `fingerprint` (of the backbone's weights) keys the disk cache."""
    key = fingerprint if config.feature_cache == "disk" else None
    start = time.perf_counter()
    train_files = files_fingerprint(splits.train) if key else None  # once, for every view
    images = len(splits.train) * (config.views + 1) + len(splits.val)
    # One inference copy (and OpenVINO conversion) for every view, made only if a view is not on disk.
    backbone = functools.cache(lambda: runtime.inference_model(model, features=True, images=images))

    def extract(samples: list, view: int, phase: str, files_key: str | None = None) -> Features:
        return extract_features(model, samples, runtime=runtime, pre=preprocessing, view=view, seed=config.seed,
                                images=images, backbone=backbone,
                                batch_size=max(config.batch_size, 32), workers=config.workers, cache_key=key,
                                files_key=files_key, on_batch=lambda s, n: callback.on_step(phase, 0, s, n, None))

    train = Features.cat([extract(splits.train, v, f"features train view {v}", train_files)
                          for v in range(config.views + 1)])
    val = extract(splits.val, 0, "features val")
    seconds = time.perf_counter() - start
    cached = " (from the disk cache)" if train.from_cache and val.from_cache else ""
    text = (f"backbone features of {images} images computed once in {seconds:.1f}s{cached} "
            f"({images / max(seconds, 1e-9):.1f} img/s); the head trains on them")
    log.info(text)
    callback.on_message(text)
    return train, val


# ---------------------------------------------------------------------------------------------
# Interrupts and the run state.

class TrainingInterrupted(Exception):
    """Raised after a Ctrl-C (or SIGTERM) once the current step is done and the run state is saved."""

    def __init__(self, out: Path, epoch: int, step: int) -> None:
        super().__init__(f"interrupted in epoch {epoch} after step {step}; the run state is saved. "
                         f"Resume with: headstart train --resume {out}")
        self.out, self.epoch, self.step = out, epoch, step


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
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunState":
        return cls(epoch=d["epoch"], progress=EpochProgress(**d["progress"]), best_acc=d["best_acc"],
                   best_epoch=d["best_epoch"], best_metrics=d["best_metrics"], best_meta=d.get("best_meta"),
                   history=[EpochRecord(**r) for r in d["history"]], skipped=dict(d["skipped"]))


STATE_FILE = "state.safetensors"


# ---------------------------------------------------------------------------------------------
# The epoch loop.

def fit(model: nn.Module, splits: DatasetSplits, *, config: TrainConfig, preprocessing: Preprocessing,
        runtime: Runtime, out: Path, callback: Callback | None = None, resume: bool = False,
        run_meta: dict[str, Any] | None = None, skipped: dict[str, str] | None = None) -> RunResult:
    """Train `model` on `splits` for config.epochs. After each epoch: validate, write a row of
    metrics.csv and the run state that `resume=True` continues from (bit-identical to an
    uninterrupted run on the CPU); `best` and `last` checkpoints as save_best/save_last say."""
    info = get_model_info(model.arch)
    classifier = info.classifier
    callback = callback or Callback()
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a process killed in the middle of an atomic write
        stale.unlink(missing_ok=True)
    # Frozen: the backbone never changes, so the run state holds only the head (a few kB instead of
    # 100 MB a epoch for ResNet50) plus the backbone's fingerprint, checked on resume.
    frozen = config.strategy == "frozen"
    use_features = frozen and config.feature_cache != "off"
    if frozen:
        freeze_backbone(model, classifier=classifier)
    runtime.prepare(model)
    state = RunState(skipped=dict(skipped or {}))
    head_prefix = f"{classifier}."

    def unprefixed(head_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k[len(head_prefix):]: v for k, v in head_tensors.items()}

    backbone_fp = weights_fingerprint(model, exclude=head_prefix) if frozen else None
    best_head: dict[str, torch.Tensor] = {}
    if resume:  # weights first: the frozen strategy's features are computed from them
        tensors, meta = load_run_state(out / STATE_FILE)
        if frozen and meta.get("backbone_fingerprint") != backbone_fp:
            raise ValueError(f"the backbone weights ({config.weights}) are not those the run {out} started with; "
                             "resume needs the same weights")
        restore_run_state(tensors, meta, model=model)
        best_head = {k[len("extra.best."):]: v for k, v in tensors.items() if k.startswith("extra.best.")}

    def on_failed(failed: list[tuple[int, str]], samples: list) -> None:
        for index, reason in failed:
            path = str(samples[index].path)
            if path not in state.skipped:
                state.skipped[path] = reason
                log.warning("skipping %s: cannot decode it (%s)", path, reason)
                callback.on_skip(path, reason)

    if use_features:
        train_feats, val_feats = cached_features(model, splits, config=config, preprocessing=preprocessing,
                                                 runtime=runtime, fingerprint=backbone_fp, callback=callback)
        head = get_head(model, classifier)
        train_x, train_y = train_feats.features.to(runtime.device), train_feats.labels.to(runtime.device)
        val_x = val_feats.features.to(runtime.device)
        steps_per_epoch = math.ceil(len(train_y) / config.batch_size)
    else:
        train_loader = make_loader(ImageDataset(splits.train, preprocessing.train_transform(), seed=config.seed),
                                   batch_size=config.batch_size, shuffle=True, workers=config.workers,
                                   seed=config.seed)
        val_loader = make_loader(ImageDataset(splits.val, preprocessing.eval_transform(), seed=config.seed),
                                 batch_size=max(config.batch_size, 32), shuffle=False, workers=config.workers)
        steps_per_epoch = len(train_loader)
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config, steps_per_epoch)
    scaler = runtime.grad_scaler()
    weight = class_weights(splits).to(runtime.device) if config.balance else None
    if resume:
        restore_run_state(tensors, meta, optimizer=optimizer)
        scheduler.load_state_dict(meta["scheduler"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        state = RunState.from_dict(meta["state"])
        state.skipped = {**(skipped or {}), **state.skipped}
        callback.on_message(f"resuming {out} after epoch {state.epoch}"
                            + (f", step {state.progress.steps} of epoch {state.epoch + 1}" if state.progress.steps else ""))
    if use_features:
        on_failed(train_feats.failed, splits.train)
        on_failed(val_feats.failed, splits.val)

    def save_state() -> None:
        sd = model.state_dict()
        save_run_state(
            out / STATE_FILE, optimizer=optimizer,
            model_tensors={k: v for k, v in sd.items() if k.startswith(head_prefix)} if frozen else sd,
            extra={f"best.{k}": v for k, v in best_head.items()},
            meta={**(run_meta or {}), "config": asdict(config), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict() if scaler is not None else None, "state": state.to_dict(),
                  "partial_model": frozen, "backbone_fingerprint": backbone_fp})

    def save_best(meta: dict[str, Any]) -> None:
        """Finetune: written at each improvement. Frozen: the best head is kept (and in the run
        state) and the checkpoint written at the end or at an interrupt."""
        if not frozen:
            save_checkpoint(out / "best", model, classes=splits.classes, preprocessing=preprocessing, **meta)
            return
        head_module = get_head(model, classifier)
        head_now = {k: v.clone() for k, v in head_module.state_dict().items()}
        head_module.load_state_dict(unprefixed(best_head))
        save_checkpoint(out / "best", model, classes=splits.classes, preprocessing=preprocessing, **meta)
        head_module.load_state_dict(head_now)

    ckpt_meta = {"config": asdict(config), "counts": splits.counts()}

    def save_last() -> None:
        """The latest weights, at the end (or at an interrupt); every epoch's are in the run state.
        Frozen: the best checkpoint too (see save_best)."""
        last = asdict(state.history[-1]) if state.history else None
        save_checkpoint(out / "last", model, classes=splits.classes, preprocessing=preprocessing, **ckpt_meta,
                        epoch=state.epoch, metrics=last)
        if frozen and best_head:
            save_best(state.best_meta)

    metrics_csv = out / "metrics.csv"
    best_val: Inference | None = None
    with StopOnSignal() as stop:
        for epoch in range(state.epoch + 1, config.epochs + 1):
            t0 = time.perf_counter() - state.progress.seconds
            lr = optimizer.param_groups[0]["lr"]
            if use_features:
                progress = train_head_one_epoch(head, train_x, train_y, optimizer, scheduler,
                                                batch_size=config.batch_size, seed=config.seed, epoch=epoch,
                                                callback=callback, progress=state.progress, stop=stop,
                                                weight=weight)
            else:
                train_loader.sampler.set_epoch(epoch, start=state.progress.steps * config.batch_size)
                progress = train_one_epoch(model, train_loader, optimizer, scheduler, runtime, preprocessing,
                                           strategy=config.strategy, epoch=epoch, classifier=classifier,
                                           scaler=scaler, callback=callback, progress=state.progress, stop=stop,
                                           on_failed=lambda f: on_failed(f, splits.train), weight=weight)
            if progress.interrupted:
                progress.interrupted = False
                state.progress = progress
                save_state()
                save_last()
                raise TrainingInterrupted(out, epoch, progress.steps)
            if use_features:
                head.eval()
                with torch.no_grad():
                    logits = head(val_x).float().cpu()
                metrics = compute_metrics(logits, val_feats.labels, splits.classes)
                inf = Inference(logits, val_feats.labels, val_feats.indices, val_feats.failed)
            else:
                val_model = model if runtime.compile else runtime.inference_model(
                    model, images=len(splits.val), keep_graph=False)  # the weights change every epoch
                inf = run_inference(val_model, val_loader, runtime, preprocessing,
                                    on_batch=lambda s, n: callback.on_step("val", epoch, s, n, None))
                on_failed(inf.failed, splits.val)
                metrics = compute_metrics(inf.logits, inf.labels, splits.classes)
            record = EpochRecord(
                epoch=epoch, epochs=config.epochs, train_loss=progress.loss, train_acc=progress.accuracy,
                val_loss=metrics.loss, val_acc=metrics.accuracy, val_balanced_acc=metrics.balanced_accuracy,
                epoch_time=time.perf_counter() - t0, step_time=progress.seconds / max(progress.steps, 1),
                images_per_s=progress.images / max(progress.seconds, 1e-9),
                data_wait=progress.wait_seconds / max(progress.seconds, 1e-9), lr=lr,
            )
            log.info(record.line())
            meta = {**ckpt_meta, "epoch": epoch, "metrics": asdict(record)}
            if metrics.accuracy > state.best_acc:
                state.best_acc, state.best_epoch, state.best_metrics = metrics.accuracy, epoch, metrics.to_dict()
                best_val, state.best_meta = inf, meta
                if frozen:
                    best_head = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(head_prefix)}
                else:
                    save_best(meta)
            state.epoch, state.progress = epoch, EpochProgress()
            state.history.append(record)
            save_state()
            _write_metrics_csv(metrics_csv, state.history)
            callback.on_epoch_end(record)
            if stop() and epoch < config.epochs:
                save_last()
                raise TrainingInterrupted(out, epoch, steps_per_epoch)
    save_last()
    # The pictures and the caller get the best model: frozen keeps its best head in memory; a
    # fine-tuned model's best weights are read back from the checkpoint.
    if frozen:
        get_head(model, classifier).load_state_dict(unprefixed(best_head))
    else:
        model.load_state_dict(read_checkpoint_meta(out / "best.safetensors")[0])
    return RunResult(out=out, best_checkpoint=out / "best.safetensors", last_checkpoint=out / "last.safetensors",
                     best_epoch=state.best_epoch, best_val_acc=state.best_acc, history=state.history,
                     best_metrics=Metrics.from_dict(state.best_metrics), skipped=state.skipped,
                     files={"metrics": metrics_csv, "state": out / STATE_FILE}, val_inference=best_val)


def _write_metrics_csv(path: Path, history: list[EpochRecord]) -> None:
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(history[0])))
        w.writeheader()
        for r in history:
            w.writerow(asdict(r))


# ---------------------------------------------------------------------------------------------
# The whole run.

def train(data: str | os.PathLike[str], *, out: str | os.PathLike[str], config: TrainConfig | None = None,
          callback: Callback | None = None, resume: bool = False) -> RunResult:
    """Train a classifier on a class-per-folder dataset; everything goes into `out`:
    best/last checkpoints (.safetensors + .json), metrics.csv, summary.json, predictions.png,
    curves.png, and state.safetensors (what `resume=True` continues from).
    """
    from . import plots  # matplotlib is imported only when pictures are drawn

    config = config or TrainConfig()
    started = time.perf_counter()
    out = Path(out)
    splits = scan_dataset(data, val_split=config.val_split, seed=config.seed)
    bad = unreadable_files(s.path for s in splits.train + splits.val)  # the check's fast part
    if bad and config.bad_files == "fail":
        listing = "\n  ".join(f"{p}: {r}" for p, r in bad.items())
        raise ValueError(f"{len(bad)} file(s) cannot be read as images (bad_files='fail'):\n  {listing}\n"
                         "remove them, or let training skip them (--bad-files skip)")
    for path, reason in bad.items():
        log.warning("skipping %s: %s", path, reason)
    splits.train = [s for s in splits.train if str(s.path) not in bad]
    splits.val = [s for s in splits.val if str(s.path) not in bad]
    info = get_model_info(config.arch)
    pre = info.preprocessing if config.image_size is None else info.preprocessing.with_image_size(config.image_size)
    runtime = resolve_runtime(device=config.device, precision=config.precision, threads=config.threads,
                              compile=config.compile and config.strategy == "finetune", engine=config.engine)
    if resume and config.strategy == "finetune":  # every weight comes from the run state
        _, meta = load_run_state(out / STATE_FILE, tensors=False)
        model = create_model(config.arch, num_classes=len(splits.classes), **meta.get("arch_kwargs", {}))
    else:
        torch.manual_seed(config.seed)  # the new head's initialisation
        model = create_model(config.arch, num_classes=len(splits.classes), weights=config.weights)
    callback = callback or Callback()
    counts = splits.counts()
    callback.on_start({"classes": splits.classes, "counts": counts, "runtime": runtime.describe(),
                       "config": asdict(config), "out": str(out)})
    log.info("training %s (%s) on %s: %d classes, %d train / %d val images, %s", config.arch, config.strategy,
             data, len(splits.classes), len(splits.train), len(splits.val), runtime.describe())
    result = fit(model, splits, config=config, preprocessing=pre, runtime=runtime, out=out, callback=callback,
                 resume=resume, run_meta={"data": str(Path(data).resolve()), "arch_kwargs": model.arch_kwargs},
                 skipped=bad)

    # The best model on the validation set: per-image predictions, the most confidently wrong, a grid.
    inf = result.val_inference
    if inf is None:  # resumed after the best epoch: compute them again
        loader = make_loader(ImageDataset(splits.val, pre.eval_transform()), batch_size=32, shuffle=False,
                             workers=config.workers)
        inf = run_inference(runtime.inference_model(model, images=len(splits.val)), loader, runtime, pre)
    result.files.update(write_val_pictures(out, inf, splits, pre))
    result.files["curves"] = plots.save_curves(out / "curves.png", [asdict(r) for r in result.history])
    result.wall_time = time.perf_counter() - started
    summary = {
        "data": str(data), "out": str(out), "classes": splits.classes, "counts": counts,
        "config": asdict(config), "runtime": runtime.describe(),
        "best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
        "best_metrics": result.best_metrics.to_dict(), "history": [asdict(r) for r in result.history],
        "skipped_files": result.skipped, "wall_time_s": result.wall_time,
        "checkpoints": {"best": str(result.best_checkpoint), "last": str(result.last_checkpoint)},
    }
    result.files["summary"] = out / "summary.json"
    with atomic_write(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    result.files["report"] = write_report([out])
    return result


def write_val_pictures(out: Path, inf: Inference, splits: DatasetSplits, pre: Preprocessing) -> dict[str, Path]:
    """predictions.csv (every validation image), top_losses.png (the most confidently wrong) and
    predictions.png (a spread of validation images, titled with the predicted class)."""
    from . import plots

    probs = inf.logits.float().softmax(1)
    pred = probs.argmax(1)
    losses = F.cross_entropy(inf.logits.float(), inf.labels, reduction="none")
    rows = []
    for i, index in enumerate(inf.indices.tolist()):
        rows.append({"path": str(splits.val[index].path), "true": splits.classes[int(inf.labels[i])],
                     "predicted": splits.classes[int(pred[i])], "probability": f"{float(probs[i, pred[i]]):.6f}",
                     "loss": f"{float(losses[i]):.6f}"})
    with atomic_write(out / "predictions.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=["path", "true", "predicted", "probability", "loss"])
        w.writeheader()
        w.writerows(rows)

    def images(rows_idx: list[int]) -> torch.Tensor:
        ds = ImageDataset([splits.val[int(inf.indices[i])] for i in rows_idx], pre.eval_transform())
        return collate([ds[k] for k in range(len(ds))]).images

    wrong = [i for i in range(len(rows)) if int(pred[i]) != int(inf.labels[i])]
    wrong = sorted(wrong, key=lambda i: -float(losses[i]))[:12]
    titles = [f"true: {rows[i]['true']}\npredicted: {rows[i]['predicted']} {float(rows[i]['probability']):.2f}"
              for i in wrong]
    files = {"predictions_csv": out / "predictions.csv"}
    files["top_losses"] = plots.save_titled_grid(out / "top_losses.png", images(wrong), titles,
                                                 ["red"] * len(wrong), empty="no validation image is misclassified")
    picks = plots.spread_indices(len(rows), 18)
    files["predictions"] = plots.save_prediction_grid(
        out / "predictions.png", images(picks), [int(inf.labels[i]) for i in picks], [int(pred[i]) for i in picks],
        splits.classes)
    return files


def resume(run: str | os.PathLike[str], *, callback: Callback | None = None) -> RunResult:
    """Continue the run in folder `run` from its last saved state, with its own data and config."""
    _, meta = load_run_state(Path(run) / STATE_FILE, tensors=False)
    config = TrainConfig(**meta["config"])
    return train(meta["data"], out=run, config=config, callback=callback, resume=True)
