"""Training strategies: what trains, on what inputs, and what a run state holds of it.

`training.fit` runs the same loop whatever the strategy:

    strategy = info.build(model, splits, ...)     # loaders, or features computed once
    stepper = Stepper.build(strategy.parameters(), config, strategy.steps_per_epoch, runtime)
    per epoch:  strategy.train_epoch(...) -> strategy.validate(...) -> metrics
                a new best: strategy.on_best(checkpoints, meta)
                run state:  strategy.run_state() (restored by strategy.restore(saved) on resume)
    at the end (and at an interrupt): strategy.save(checkpoints); at the end: strategy.finish(checkpoints)

The tutorial's two strategies, registered below:
- finetune (`FineTune`): every parameter trains; SGD momentum 0.9.
- frozen: only the head trains (SGD momentum 0.5); the backbone runs in eval mode under no_grad,
  so its BatchNorm statistics do not move and every backbone tensor stays bit-identical.
  `HeadOnFeatures` computes the backbone's features once and trains the head on them (the
  default); `HeadOnFrozenBackbone` runs the backbone on every step (--feature-cache off).

A new strategy is a new class and one `register_strategy` call; nothing else changes.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import RunCheckpoints
from .data import DatasetSplits, ImageDataset, make_loader, sample_seed
from .features import Features, extract_features, files_fingerprint
from .inference import INFERENCE_BATCH_SIZE, Inference, run_inference
from .models import freeze_backbone, get_head, get_model_info
from .preprocessing import Preprocessing
from .registry import Registry
from .runstate import EpochProgress, SavedRun
from .runtime import Runtime
from .weights import weights_fingerprint

if TYPE_CHECKING:
    from .training import Callback, TrainConfig

StateDict = dict[str, torch.Tensor]
Stop = Callable[[], bool]


# ---------------------------------------------------------------------------------------------
# The optimizer, its schedule, the loss weights: the same for every strategy.

@dataclass
class Stepper:
    """SGD with momentum, its per-step learning-rate schedule and (fp16 only) a gradient scaler:
    `step(loss)` is one update."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None

    @classmethod
    def build(cls, params: Sequence[nn.Parameter], config: "TrainConfig", steps_per_epoch: int,
              runtime: Runtime) -> "Stepper":
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        return cls(optimizer, make_scheduler(optimizer, config, steps_per_epoch), runtime.grad_scaler())

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


def make_scheduler(optimizer: torch.optim.Optimizer, config: "TrainConfig",
                   steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """constant, or cosine per step from lr down to 1% of it over the run."""
    total = max(1, config.epochs * steps_per_epoch)
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def class_weights(splits: DatasetSplits) -> torch.Tensor:
    """Inverse class frequency of the training split, normalised to mean 1: weight_c = N / (K * n_c)."""
    counts = torch.bincount(torch.tensor([s.label for s in splits.train]), minlength=len(splits.classes)).float()
    return counts.sum() / (len(counts) * counts.clamp(min=1))


# ---------------------------------------------------------------------------------------------
# One epoch: over images through a network, or over cached features through the head.

def set_train_mode(model: nn.Module, *, trainable: Sequence[nn.Module] | None = None) -> None:
    """Everything in train mode, or only the `trainable` modules: the rest (a frozen backbone,
    with its BatchNorm layers) stays in eval mode, so its running statistics do not change."""
    if trainable is None:
        model.train()
        return
    model.eval()
    for m in trainable:
        m.train()


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, stepper: Stepper, runtime: Runtime,
                    pre: Preprocessing, *, epoch: int, callback: "Callback | None" = None,
                    on_failed: Callable[[list[tuple[int, str]]], None] | None = None,
                    progress: EpochProgress | None = None, stop: Stop | None = None,
                    weight: torch.Tensor | None = None) -> EpochProgress:
    """One pass over `loader` (continuing `progress`): `model(x)` gives logits, `stepper` updates
    what requires grad; `weight`: per-class loss weights. Train/eval modes are the caller's. Returns
    early, `interrupted`, when `stop()` turns true after a step.

    Cost per 224x224 image for ResNet50: about 24 GFLOP forward + backward through every layer,
    about 8.2 GFLOP when only the head trains (forward only).
    """
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
        x = runtime.inputs(batch.images, pre)  # (N, 3, S, S) float, channels_last
        y = batch.labels.to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, weight=weight)
        stepper.step(loss)
        progress.add(float(loss.detach()), int((logits.argmax(1) == y).sum()), len(batch))
        if callback:
            callback.on_step("train", epoch, progress.steps, total, progress.loss_sum / progress.images)
        if stop and stop():
            progress.interrupted = True
            break
    progress.seconds = time.perf_counter() - start
    return progress


def train_head_one_epoch(head: nn.Module, features: torch.Tensor, labels: torch.Tensor, stepper: Stepper, *,
                         batch_size: int, seed: int, epoch: int, callback: "Callback | None" = None,
                         progress: EpochProgress | None = None, stop: Stop | None = None,
                         weight: torch.Tensor | None = None) -> EpochProgress:
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
        stepper.step(loss)
        progress.add(float(loss.detach()), int((logits.argmax(1) == labels[rows]).sum()), len(rows))
        if callback:
            callback.on_step("train", epoch, progress.steps, len(batches), progress.loss_sum / progress.images)
        if stop and stop():
            progress.interrupted = True
            break
    progress.seconds = time.perf_counter() - start
    return progress


# ---------------------------------------------------------------------------------------------
# The protocol.

class Strategy:
    """One way to train. Subclasses set `steps_per_epoch` in __init__ and implement the methods
    below; `fit` calls them as the module docstring shows."""

    steps_per_epoch: int

    def __init__(self, model: nn.Module, splits: DatasetSplits, *, config: "TrainConfig",
                 preprocessing: Preprocessing, runtime: Runtime, callback: "Callback",
                 skip: Callable[[str, str], None]) -> None:
        self.model, self.splits, self.config, self.pre, self.runtime = model, splits, config, preprocessing, runtime
        self.callback, self.skip = callback, skip
        self.classifier = get_model_info(model.arch).classifier
        self.head = get_head(model, self.classifier)
        self.weight = class_weights(splits).to(runtime.device) if config.balance else None

    def parameters(self) -> list[nn.Parameter]:
        """The parameters that train."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        raise NotImplementedError

    def validate(self, epoch: int) -> Inference:
        """Logits of the validation images."""
        raise NotImplementedError

    def run_state(self) -> tuple[StateDict, StateDict, dict[str, Any]]:
        """(model tensors, the strategy's extra tensors, JSON) for the run state."""
        return self.model.state_dict(), {}, {}

    def restore(self, saved: SavedRun) -> None:
        """Continue from a run state written from `run_state()`."""
        try:
            self.model.load_state_dict(saved.part("model"), strict=True)
        except RuntimeError as e:
            raise ValueError(f"run state does not fit the model: {e}") from e

    def on_best(self, checkpoints: RunCheckpoints, meta: dict[str, Any]) -> None:
        """A new best epoch (`meta`: its epoch and metrics): keep its weights."""
        checkpoints.write("best", **meta)

    def save(self, checkpoints: RunCheckpoints) -> None:
        """Write what the strategy keeps in memory; at the end of the run and at an interrupt."""

    def finish(self, checkpoints: RunCheckpoints) -> None:
        """After the last epoch: the model gets the best epoch's weights."""
        self.model.load_state_dict(checkpoints.read("best"))

    # Helpers for strategies that read images every epoch.

    def _image_loaders(self) -> None:
        c = self.config
        self.train_loader = make_loader(ImageDataset(self.splits.train, self.pre.train_transform(), seed=c.seed),
                                        batch_size=c.batch_size, shuffle=True, workers=c.workers, seed=c.seed)
        self.val_loader = make_loader(ImageDataset(self.splits.val, self.pre.eval_transform(), seed=c.seed),
                                      batch_size=max(c.batch_size, INFERENCE_BATCH_SIZE), shuffle=False,
                                      workers=c.workers)
        self.steps_per_epoch = len(self.train_loader)

    def _train_images(self, forward: nn.Module, epoch: int, stepper: Stepper, progress: EpochProgress,
                      stop: Stop) -> EpochProgress:
        self.train_loader.sampler.set_epoch(epoch, start=progress.steps * self.config.batch_size)
        return train_one_epoch(forward, self.train_loader, stepper, self.runtime, self.pre, epoch=epoch,
                               callback=self.callback, on_failed=functools.partial(self._failed, self.splits.train),
                               progress=progress, stop=stop, weight=self.weight)

    def _validate_images(self, epoch: int) -> Inference:
        model = self.model if self.runtime.compile else self.runtime.inference_model(
            self.model, images=len(self.splits.val), keep_graph=False)  # the weights change every epoch
        inf = run_inference(model, self.val_loader, self.runtime, self.pre,
                            on_batch=lambda s, n: self.callback.on_step("val", epoch, s, n, None))
        self._failed(self.splits.val, inf.failed)
        return inf

    def _failed(self, samples: list, failed: list[tuple[int, str]]) -> None:
        for index, reason in failed:
            self.skip(str(samples[index].path), reason)


class FineTune(Strategy):
    """Every layer trains, BatchNorm statistics included."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self.runtime.prepare(model)
        self._image_loaders()

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        set_train_mode(self.model)
        return self._train_images(self.model, epoch, stepper, progress, stop)

    def validate(self, epoch: int) -> Inference:
        return self._validate_images(epoch)


class HeadOnly(Strategy):
    """Only the head trains; the backbone is frozen, so the run state holds the head (a few kB
    instead of 100 MB an epoch for ResNet50) and a fingerprint of the backbone, checked on resume.
    The best head is kept in memory (and in the run state) and its checkpoint written by `save`."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        freeze_backbone(model, classifier=self.classifier)
        self.runtime.prepare(model)
        self.prefix = f"{self.classifier}."
        self.fingerprint = weights_fingerprint(model, exclude=self.prefix)
        self.best: StateDict = {}  # the best epoch's head, by model state-dict key
        self.best_meta: dict[str, Any] = {}

    def parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _head_tensors(self) -> StateDict:
        return {k: v for k, v in self.model.state_dict().items() if k.startswith(self.prefix)}

    def run_state(self) -> tuple[StateDict, StateDict, dict[str, Any]]:
        return (self._head_tensors(), {f"best.{k}": v for k, v in self.best.items()},
                {"partial_model": True, "backbone_fingerprint": self.fingerprint})

    def restore(self, saved: SavedRun) -> None:
        if saved.meta.get("backbone_fingerprint") != self.fingerprint:
            raise ValueError(f"the backbone weights ({self.config.weights}) are not those the run started with; "
                             "resume needs the same weights")
        try:
            _, unexpected = self.model.load_state_dict(saved.part("model"), strict=False)
        except RuntimeError as e:
            raise ValueError(f"run state does not fit the model: {e}") from e
        if unexpected:
            raise ValueError(f"run state does not fit the model: unexpected {unexpected[:5]}")
        self.best = {k[len("best."):]: v for k, v in saved.part("extra").items() if k.startswith("best.")}
        self.best_meta = saved.state.best_meta or {}

    def on_best(self, checkpoints: RunCheckpoints, meta: dict[str, Any]) -> None:
        self.best = {k: v.detach().clone() for k, v in self._head_tensors().items()}
        self.best_meta = meta

    def save(self, checkpoints: RunCheckpoints) -> None:
        if self.best:
            checkpoints.write("best", tensors={**self.model.state_dict(), **self.best}, **self.best_meta)

    def finish(self, checkpoints: RunCheckpoints) -> None:
        self.model.load_state_dict(self.best, strict=False)


class HeadOnFeatures(HeadOnly):
    """The head trains on backbone features computed once per image (and augmented view): ten
    epochs cost one backbone pass instead of ten (`features.py`)."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self.train_features, self.val_features = self._features()
        self._failed(splits.train, self.train_features.failed)
        self._failed(splits.val, self.val_features.failed)
        device = self.runtime.device
        self.train_x, self.train_y = self.train_features.features.to(device), self.train_features.labels.to(device)
        self.val_x = self.val_features.features.to(device)
        self.steps_per_epoch = math.ceil(len(self.train_y) / self.config.batch_size)

    def _features(self) -> tuple[Features, Features]:
        """(train, val) features: train = eval view + `config.views` augmented views. The backbone's
        fingerprint keys the disk cache."""
        c, splits, runtime = self.config, self.splits, self.runtime
        key = self.fingerprint if c.feature_cache == "disk" else None
        start = time.perf_counter()
        train_files = files_fingerprint(splits.train) if key else None  # once, for every view
        images = len(splits.train) * (c.views + 1) + len(splits.val)
        # One inference copy (and OpenVINO conversion) for every view, made only if a view is not on disk.
        backbone = functools.cache(lambda: runtime.inference_model(self.model, features=True, images=images))

        def extract(samples: list, view: int, phase: str, files_key: str | None = None) -> Features:
            return extract_features(self.model, samples, runtime=runtime, pre=self.pre, view=view, seed=c.seed,
                                    images=images, backbone=backbone,
                                    batch_size=max(c.batch_size, INFERENCE_BATCH_SIZE), workers=c.workers,
                                    cache_key=key, files_key=files_key,
                                    on_batch=lambda s, n: self.callback.on_step(phase, 0, s, n, None))

        train = Features.cat([extract(splits.train, v, f"features train view {v}", train_files)
                              for v in range(c.views + 1)])
        val = extract(splits.val, 0, "features val")
        seconds = time.perf_counter() - start
        cached = " (from the disk cache)" if train.from_cache and val.from_cache else ""
        self.callback.on_message(f"backbone features of {images} images computed once in {seconds:.1f}s{cached} "
                                 f"({images / max(seconds, 1e-9):.1f} img/s); the head trains on them")
        return train, val

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        return train_head_one_epoch(self.head, self.train_x, self.train_y, stepper, batch_size=self.config.batch_size,
                                    seed=self.config.seed, epoch=epoch, callback=self.callback, progress=progress,
                                    stop=stop, weight=self.weight)

    def validate(self, epoch: int) -> Inference:
        self.head.eval()
        with torch.no_grad():
            logits = self.head(self.val_x).float().cpu()
        v = self.val_features
        return Inference(logits, v.labels, v.indices, v.failed)


class _FrozenForward(nn.Module):
    """logits = head(backbone features computed under no_grad): the gradient reaches the head only."""

    def __init__(self, model: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            features = self.model.forward_features(x)  # (N, F)
        return self.head(features)


class HeadOnFrozenBackbone(HeadOnly):
    """The head trains on the frozen backbone's output for augmented images, the backbone run on
    every step (no feature cache)."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self._image_loaders()
        self.forward = _FrozenForward(model, self.head)

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        set_train_mode(self.model, trainable=[self.head])
        return self._train_images(self.forward, epoch, stepper, progress, stop)

    def validate(self, epoch: int) -> Inference:
        return self._validate_images(epoch)


# ---------------------------------------------------------------------------------------------
# The registry.

@dataclass(frozen=True)
class StrategyInfo:
    name: str
    build: Callable[..., Strategy]  # (model, splits, *, config, preprocessing, runtime, callback, skip)
    momentum: float  # the default SGD momentum (the tutorial's)
    description: str  # one line, for --help
    holds_weights: bool = True  # the run state holds every weight (else resume rebuilds them from config.weights)
    compiles: bool = False  # --compile applies (torch.compile of the network that trains)


STRATEGIES: Registry[StrategyInfo] = Registry("strategy")


def register_strategy(info: StrategyInfo) -> StrategyInfo:
    """Add a strategy (its name must be new); `headstart train --strategy NAME` then runs it."""
    return STRATEGIES.register(info.name, info)


def get_strategy(name: str) -> StrategyInfo:
    return STRATEGIES.lookup(name)


def _frozen(model: nn.Module, splits: DatasetSplits, *, config: "TrainConfig", **kw: Any) -> HeadOnly:
    cls = HeadOnFrozenBackbone if config.feature_cache == "off" else HeadOnFeatures
    return cls(model, splits, config=config, **kw)


register_strategy(StrategyInfo("finetune", FineTune, momentum=0.9, compiles=True,
                               description="train all layers"))
register_strategy(StrategyInfo("frozen", _frozen, momentum=0.5, holds_weights=False,
                               description="train only the new head on the frozen backbone"))
