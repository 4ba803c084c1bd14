"""What every strategy is (`Strategy`, the protocol `loop.fit` calls), the helpers of those that
read images every epoch (`ImageEpochs`), and the backbone's features for those that start from
them (`cached_features`, `head_on_features`).

`loop.fit` runs the same loop whatever the strategy:

    strategy = info.build(model, splits, ...)   # cheap: what trains, the data loaders
    baseline = strategy.start(saved)            # its tensors from a run state; or features, a head
                                                # fitted on them (epoch 0), a plan: what it needs first
    strategy.distribute()                       # data-parallel runs only: DDP, or rank 0 trains alone
    stepper = Stepper.build(strategy.parameters(), config, strategy.epochs * strategy.steps_per_epoch, ...)
    per epoch:  strategy.train_epoch(...) -> strategy.validate(...) -> metrics
                a new best: the loop keeps strategy.best_tensors(epoch) (only `trained_part` of them, in
                memory, where the strategy trains a part) and writes best.safetensors
                run state:  strategy.run_state(), and what the loop keeps
    at the end: the loop loads the best epoch's weights into the model

A strategy says what trains and what to save; the loop (loop.py) writes every file.
"""

from __future__ import annotations

import functools
import time
from typing import TYPE_CHECKING, Any, Callable

import torch.nn.functional as F
from torch import nn

from headstart.analysis.linear import FOLDS, HeadFit, fit_head
from headstart.data import DatasetSplits, ImageDataset, make_loader
from headstart.data.transforms import CropSchedule, Preprocessing
from headstart.io.formats.safetensors import StateDict
from headstart.io.runstate import EpochProgress, SavedRun
from headstart.io.weights import weights_fingerprint
from headstart.models import get_head, get_model_info
from headstart.runtime.device import Runtime
from headstart.runtime.features import Features, calibration_inputs, extract_features, files_fingerprint
from headstart.runtime.inference import INFERENCE_BATCH_SIZE, Inference, run_inference
from headstart.training.epochs import Stop, set_train_mode, train_one_epoch
from headstart.training.interrupts import StopRequested
from headstart.training.optim import Stepper, class_weights

if TYPE_CHECKING:
    from headstart.training.callbacks import Callback
    from headstart.training.config import TrainConfig


Baseline = tuple[EpochProgress, Inference]  # epoch 0, where a strategy starts from a result of its own


class Strategy:
    """One way to train. `fit` calls these as the module docstring shows; `steps_per_epoch` is set
    by __init__ or by `start`."""

    steps_per_epoch: int = 0
    # Where only part of the model trains (the head), its state-dict key prefix: the loop keeps that
    # part of the best epoch in memory and in the run state, and writes best.safetensors at the end
    # (or at an interrupt) instead of 100 MB at every new best.
    trained_part: str | None = None
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

    def best_tensors(self, epoch: int) -> StateDict | None:
        """The model's tensors as epoch `epoch`, a new best, is to be kept; None: the model as it is
        (auto's epoch 0: with the head fitted on the features). The loop writes them."""
        return None

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
