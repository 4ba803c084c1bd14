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
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import save_checkpoint
from .data import DatasetSplits, ImageDataset, collate, make_loader, sample_seed, scan_dataset
from .download import atomic_write
from .evaluation import Metrics, compute_metrics, run_inference
from .features import Features, extract_features, weights_fingerprint
from .models import create_model, freeze_backbone, get_model_info
from .preprocessing import Preprocessing
from .runtime import Runtime, resolve_runtime

log = logging.getLogger(__name__)

STRATEGIES = ("finetune", "frozen")
DEFAULT_MOMENTUM = {"finetune": 0.9, "frozen": 0.5}
SCHEDULES = ("constant", "cosine")
FEATURE_CACHES = ("off", "memory", "disk")


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
    feature_cache: str = "disk"  # frozen: off (backbone every step) | memory | disk (reused across runs)
    views: int = 0  # frozen with a feature cache: augmented views per image, besides the eval view

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy {self.strategy!r} is not one of {STRATEGIES}")
        if self.feature_cache not in FEATURE_CACHES:
            raise ValueError(f"feature_cache {self.feature_cache!r} is not one of {FEATURE_CACHES}")
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
                f"val acc {self.val_acc:.4f}  time {self.epoch_time:.1f}s  {self.step_time:.3f}s/step  "
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


# ---------------------------------------------------------------------------------------------
# Small pieces.

def set_train_mode(model: nn.Module, strategy: str, *, classifier: str = "fc") -> None:
    """finetune: everything in train mode. frozen: only the head; the backbone's BatchNorm layers
    stay in eval mode so their running statistics do not change."""
    if strategy == "finetune":
        model.train()
    else:
        model.eval()
        getattr(model, classifier).train()


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD with momentum over the parameters that require grad (only the head's when frozen)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    images: int
    steps: int
    seconds: float
    wait_seconds: float


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, runtime: Runtime, pre: Preprocessing, *, strategy: str, epoch: int,
                    classifier: str = "fc", scaler: torch.amp.GradScaler | None = None,
                    callback: Callback | None = None, on_failed=None) -> EpochStats:
    """One pass over `loader`. Frozen: features under no_grad, gradient only through the head.

    Cost per 224x224 image for ResNet50: finetune about 24 GFLOP (forward + backward), frozen about
    8.2 GFLOP (forward only).
    """
    set_train_mode(model, strategy, classifier=classifier)
    head = getattr(model, classifier)
    loss_sum, correct, n, steps, wait = 0.0, 0, 0, 0, 0.0
    start = time.perf_counter()
    it = iter(loader)
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        wait += time.perf_counter() - t
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
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        scheduler.step()
        steps += 1
        loss_value = float(loss.detach())
        loss_sum += loss_value * len(batch)
        correct += int((logits.argmax(1) == y).sum())
        n += len(batch)
        if callback:
            callback.on_step("train", epoch, steps, len(loader), loss_value)
    return EpochStats(loss_sum / max(n, 1), correct / max(n, 1), n, steps, time.perf_counter() - start, wait)


def train_head_one_epoch(head: nn.Module, features: torch.Tensor, labels: torch.Tensor,
                         optimizer: torch.optim.Optimizer, scheduler: Any, *, batch_size: int, seed: int, epoch: int,
                         callback: Callback | None = None) -> EpochStats:
    """One pass of the head over cached features (N, F), shuffled by (seed, epoch), in fp32.

    Cost: 2*F*C FLOP per row forward, e.g. 8 kFLOP for ResNet50 features and 2 classes.
    """
    head.train()
    g = torch.Generator().manual_seed(sample_seed(seed, epoch, -2) % 2**63)
    order = torch.randperm(len(labels), generator=g).to(features.device)
    loss_sum, correct, steps = 0.0, 0, 0
    start = time.perf_counter()
    batches = order.split(batch_size)
    for rows in batches:
        logits = head(features[rows])
        loss = F.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        steps += 1
        loss_value = float(loss.detach())
        loss_sum += loss_value * len(rows)
        correct += int((logits.argmax(1) == labels[rows]).sum())
        if callback:
            callback.on_step("train", epoch, steps, len(batches), loss_value)
    n = len(labels)
    return EpochStats(loss_sum / max(n, 1), correct / max(n, 1), n, steps, time.perf_counter() - start, 0.0)


def cached_features(model: nn.Module, splits: DatasetSplits, *, config: TrainConfig, preprocessing: Preprocessing,
                    runtime: Runtime, classifier: str, callback: Callback) -> tuple[Features, Features]:
    """(train, val) features of the frozen backbone: train = eval view + `config.views` augmented views."""
    key = weights_fingerprint(model, exclude=f"{classifier}.") if config.feature_cache == "disk" else None
    start = time.perf_counter()

    def extract(samples: list, view: int, phase: str) -> Features:
        return extract_features(model, samples, runtime=runtime, pre=preprocessing, view=view, seed=config.seed,
                                batch_size=max(config.batch_size, 32), workers=config.workers, cache_key=key,
                                on_batch=lambda s, n: callback.on_step(phase, 0, s, n, None))

    train = Features.cat([extract(splits.train, v, f"features train view {v}") for v in range(config.views + 1)])
    val = extract(splits.val, 0, "features val")
    seconds = time.perf_counter() - start
    images = len(splits.train) * (config.views + 1) + len(splits.val)
    cached = " (from the disk cache)" if train.from_cache and val.from_cache else ""
    text = (f"backbone features of {images} images computed once in {seconds:.1f}s{cached} "
            f"({images / max(seconds, 1e-9):.1f} img/s); the head trains on them")
    log.info(text)
    callback.on_message(text)
    return train, val


# ---------------------------------------------------------------------------------------------
# The epoch loop.

def fit(model: nn.Module, splits: DatasetSplits, *, config: TrainConfig, preprocessing: Preprocessing,
        runtime: Runtime, out: Path, callback: Callback | None = None) -> RunResult:
    """Train `model` on `splits` for config.epochs; after each epoch validate, write `last` and (when
    val accuracy improves) `best` checkpoints and a row of metrics.csv."""
    info = get_model_info(model.arch)
    classifier = info.classifier
    callback = callback or Callback()
    out.mkdir(parents=True, exist_ok=True)
    use_features = config.strategy == "frozen" and config.feature_cache != "off"
    if config.strategy == "frozen":
        freeze_backbone(model, classifier=classifier)
    runtime.prepare(model)

    skipped: dict[str, str] = {}

    def on_failed(failed: list[tuple[int, str]], samples: list) -> None:
        for index, reason in failed:
            path = str(samples[index].path)
            if path not in skipped:
                skipped[path] = reason
                log.warning("skipping %s: cannot decode it (%s)", path, reason)
                callback.on_skip(path, reason)

    if use_features:
        train_feats, val_feats = cached_features(model, splits, config=config, preprocessing=preprocessing,
                                                 runtime=runtime, classifier=classifier, callback=callback)
        on_failed(train_feats.failed, splits.train)
        on_failed(val_feats.failed, splits.val)
        head = getattr(model, classifier)
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

    ckpt_meta = {"config": asdict(config), "counts": splits.counts()}
    history: list[EpochRecord] = []
    best_acc, best_epoch, best_state, best_metrics = -1.0, 0, None, None
    metrics_csv = out / "metrics.csv"
    for epoch in range(1, config.epochs + 1):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        if use_features:
            stats = train_head_one_epoch(head, train_x, train_y, optimizer, scheduler, batch_size=config.batch_size,
                                         seed=config.seed, epoch=epoch, callback=callback)
            head.eval()
            with torch.no_grad():
                logits = head(val_x).float().cpu()
            metrics = compute_metrics(logits, val_feats.labels, splits.classes)
        else:
            train_loader.sampler.set_epoch(epoch)
            stats = train_one_epoch(model, train_loader, optimizer, scheduler, runtime, preprocessing,
                                    strategy=config.strategy, epoch=epoch, classifier=classifier, scaler=scaler,
                                    callback=callback, on_failed=lambda f: on_failed(f, splits.train))
            val_model = model if runtime.compile else runtime.inference_model(model)  # conv-bn folded copy
            inf = run_inference(val_model, val_loader, runtime, preprocessing,
                                on_batch=lambda s, n: callback.on_step("val", epoch, s, n, None))
            on_failed(inf.failed, splits.val)
            metrics = compute_metrics(inf.logits, inf.labels, splits.classes)
        record = EpochRecord(
            epoch=epoch, epochs=config.epochs, train_loss=stats.loss, train_acc=stats.accuracy,
            val_loss=metrics.loss, val_acc=metrics.accuracy, val_balanced_acc=metrics.balanced_accuracy,
            epoch_time=time.perf_counter() - t0, step_time=stats.seconds / max(stats.steps, 1),
            images_per_s=stats.images / max(stats.seconds, 1e-9), data_wait=stats.wait_seconds / max(stats.seconds, 1e-9),
            lr=lr,
        )
        history.append(record)
        log.info(record.line())
        meta = {**ckpt_meta, "epoch": epoch, "metrics": asdict(record)}
        save_checkpoint(out / "last", model, classes=splits.classes, preprocessing=preprocessing, **meta)
        if metrics.accuracy > best_acc:
            best_acc, best_epoch, best_metrics = metrics.accuracy, epoch, metrics
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_checkpoint(out / "best", model, classes=splits.classes, preprocessing=preprocessing, **meta)
        _write_metrics_csv(metrics_csv, history)
        callback.on_epoch_end(record)
    assert best_state is not None and best_metrics is not None
    model.load_state_dict(best_state)
    return RunResult(out=out, best_checkpoint=out / "best.safetensors", last_checkpoint=out / "last.safetensors",
                     best_epoch=best_epoch, best_val_acc=best_acc, history=history, best_metrics=best_metrics,
                     skipped=skipped, files={"metrics": metrics_csv})


def _write_metrics_csv(path: Path, history: list[EpochRecord]) -> None:
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(history[0])))
        w.writeheader()
        for r in history:
            w.writerow(asdict(r))


# ---------------------------------------------------------------------------------------------
# The whole run.

def train(data: str | os.PathLike[str], *, out: str | os.PathLike[str], config: TrainConfig | None = None,
          callback: Callback | None = None) -> RunResult:
    """Train a classifier on a class-per-folder dataset; everything goes into `out`:
    best/last checkpoints (.safetensors + .json), metrics.csv, summary.json, predictions.png, curves.png.
    """
    from . import plots  # matplotlib is imported only when pictures are drawn

    config = config or TrainConfig()
    started = time.perf_counter()
    out = Path(out)
    splits = scan_dataset(data, val_split=config.val_split, seed=config.seed)
    info = get_model_info(config.arch)
    pre = info.preprocessing if config.image_size is None else info.preprocessing.with_image_size(config.image_size)
    runtime = resolve_runtime(device=config.device, precision=config.precision, threads=config.threads,
                              compile=config.compile and config.strategy == "finetune")
    torch.manual_seed(config.seed)  # the new head's initialisation
    model = create_model(config.arch, num_classes=len(splits.classes), weights=config.weights)
    callback = callback or Callback()
    counts = splits.counts()
    callback.on_start({"classes": splits.classes, "counts": counts, "runtime": runtime.describe(),
                       "config": asdict(config), "out": str(out)})
    log.info("training %s (%s) on %s: %d classes, %d train / %d val images, %s", config.arch, config.strategy,
             data, len(splits.classes), len(splits.train), len(splits.val), runtime.describe())
    result = fit(model, splits, config=config, preprocessing=pre, runtime=runtime, out=out, callback=callback)

    # Pictures of the best model: validation images titled with the predicted class.
    picks = plots.spread_indices(len(splits.val), 18)
    val_ds = ImageDataset([splits.val[i] for i in picks], pre.eval_transform())
    batch = collate([val_ds[i] for i in range(len(val_ds))])
    model.eval()
    with torch.no_grad(), runtime.autocast():
        pred = model(runtime.inputs(batch.images, pre)).argmax(1).tolist() if len(batch) else []
    result.files["predictions"] = plots.save_prediction_grid(
        out / "predictions.png", batch.images, batch.labels.tolist(), pred, splits.classes)
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
    return result
