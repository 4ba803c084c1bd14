"""One epoch: batches of images through a network (`train_one_epoch`), or cached features through
the head (`train_head_one_epoch`); the network with its lower stages frozen (`StagesFrom`); and a
few steps timed (auto's plan). Train/eval modes are set here, losses checked for divergence."""

from __future__ import annotations

import copy
import itertools
import math
import statistics
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from headstart.data import sample_seed
from headstart.data.transforms import Preprocessing
from headstart.io.runstate import EpochProgress
from headstart.models.stages import run_stages
from headstart.runtime.device import Runtime
from headstart.training.interrupts import TrainingDiverged
from headstart.training.optim import Stepper

if TYPE_CHECKING:
    from headstart.training.callbacks import Callback
    from headstart.training.config import TrainConfig

Stop = Callable[[], bool]


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
