"""auto, the default: a head fitted on the backbone's features (epoch 0), then a fine-tune from the
stage and for the epochs that fit --budget, chosen by timing a few steps of each; and `--arch
auto`'s choice of backbone."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from headstart.analysis.linear import fit_head
from headstart.data import DatasetSplits
from headstart.io.formats.safetensors import StateDict
from headstart.io.runstate import SavedRun
from headstart.io.weights import weights_fingerprint
from headstart.models import MODELS, create_model, get_model_info
from headstart.runtime.clock import format_duration as _duration
from headstart.runtime.device import Runtime
from headstart.training.epochs import time_training_steps
from headstart.training.strategies.base import Baseline, cached_features, head_on_features
from headstart.training.strategies.partial import Partial

if TYPE_CHECKING:
    from headstart.training.callbacks import Callback
    from headstart.training.config import TrainConfig


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

    def best_tensors(self, epoch: int) -> StateDict | None:
        if epoch == 0:  # the head fitted on the features; the model keeps its new head for training
            return {**self.model.state_dict(), **self.baseline_head}
        return None

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
