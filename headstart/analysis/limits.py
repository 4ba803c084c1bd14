"""Your model's reach: calibrated confidence and "none of these" (confidence.py's math).
`fit_limits`, at the end of every run, fits the temperature and the unknown-image test on the
validation split with the trained model's own features; `outputs` gives the features and logits
in one pass. Cost: one backbone pass per image (kept in the disk feature cache), then L-BFGS fits
on (N, F) features: seconds for thousands of images.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from headstart.analysis import confidence
from headstart.data import DatasetSplits, Sample
from headstart.data.transforms import Preprocessing
from headstart.io.weights import weights_fingerprint
from headstart.models import get_head, get_model_info
from headstart.runtime.device import Runtime
from headstart.runtime.features import Features, extract_features
from headstart.runtime.inference import INFERENCE_BATCH_SIZE

# ---------------------------------------------------------------------------------------------
# Calibrated confidence and unknown images.

def outputs(model: torch.nn.Module, samples: Sequence[Sample], *, runtime: Runtime, pre: Preprocessing,
            images: int | None = None, batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 2, cache: bool = False,
            backbone: Callable[[], torch.nn.Module] | None = None,
            on_batch: Callable[[int, int], None] | None = None) -> tuple[Features, torch.Tensor]:
    """(pooled features, logits (N, C) float32) of `samples` in one backbone pass: the features
    through `runtime`'s inference copy (or `backbone()`'s, see extract_features), the classifier
    applied to them in float32. `cache`: through the disk feature cache (keyed by the backbone's
    weights: a pretrained backbone's are there)."""
    arch = getattr(model, "arch", "resnet50")
    images = len(samples) if images is None else images
    fingerprint = weights_fingerprint(model, exclude=f"{get_model_info(arch).classifier}.") if cache else None
    feats = extract_features(model, samples, runtime=runtime, pre=pre, cache_key=fingerprint, images=images,
                             batch_size=batch_size, workers=workers, backbone=backbone, on_batch=on_batch)
    head = get_head(model, get_model_info(arch).classifier)
    with torch.no_grad():
        logits = head(feats.features.to(next(head.parameters()).device)).float().cpu() if len(feats.labels) \
            else torch.empty(0, head.out_features)
    return feats, logits


@dataclass
class ModelLimits:
    """What `fit_limits` measured on the validation split, and what the checkpoint keeps of it."""

    temperature: float  # what the checkpoint applies: `fitted`, where it lowered the held-out ECE, else 1
    fitted: float  # the T fitted on every validation image (confidence.fit_temperature)
    ece_before: float  # confidence.calibration_error of the raw probabilities
    ece_after: float  # ... of the probabilities at `fitted` (in-sample: T was fitted on these images)
    ece_held_out: float  # ... with T fitted on the other half of them (confidence.held_out_calibration_error)
    reliability_before: list[confidence.Bin]
    reliability_after: list[confidence.Bin]  # at `fitted`
    rejection: confidence.Rejection | None  # None below confidence.MIN_VALIDATION validation images
    reference: torch.Tensor  # (R, F) float16 unit training features (confidence.reference_features)
    val_images: int
    seconds: float = 0.0

    def line(self) -> str:
        """What was fitted and kept, for the run's console."""
        held = f"{self.ece_held_out:.4f} with T fitted on the other half"
        if self.temperature == self.fitted:
            return (f"temperature {self.fitted:.3f}, validation ECE {self.ece_before:.4f} -> {self.ece_after:.4f} "
                    f"(in-sample), {held}")
        return (f"temperature 1 kept: T = {self.fitted:.3f} was fitted, but with T fitted on one half of the validation "
                f"images the other half's ECE was {self.ece_held_out:.4f}, not under the {self.ece_before:.4f} of no T")

    def checkpoint_meta(self) -> dict[str, object]:
        """The entries `add_to_checkpoint` writes: "calibration" and "unknown"."""
        held_out = None if math.isnan(self.ece_held_out) else self.ece_held_out
        return {"calibration": {"temperature": self.temperature, "fitted": self.fitted,
                                "kept": self.temperature != 1.0, "ece_before": self.ece_before,
                                "ece_after": self.ece_after, "ece_held_out": held_out, "halvings": confidence.HALVINGS,
                                "bins": confidence.BINS, "val_images": self.val_images},
                **({"unknown": self.rejection.to_dict()} if self.rejection else {})}

    def summary(self) -> dict[str, object]:
        """summary.json's entries (the rejection without its sorted score lists)."""
        meta = self.checkpoint_meta()
        r = self.rejection
        return {"calibration": {**meta["calibration"],
                                "reliability": [[b.low, b.high, b.count, b.confidence, b.accuracy]
                                                for b in self.reliability_after]},
                "unknown": {"threshold": r.threshold, "false_rejection": r.false_rejection,
                            "reference_images": len(self.reference), "seconds": self.seconds} if r else None}


def fit_limits(model: torch.nn.Module, splits: DatasetSplits, *, runtime: Runtime, pre: Preprocessing,
               workers: int = 2, false_rejection: float = confidence.FALSE_REJECTION) -> ModelLimits | None:
    """Temperature and unknown-image test of a trained `model` (in eval mode, left as it is), fitted
    on `splits.val` against the features of `splits.train` (view 0); None without validation images.
    Cost: one backbone pass over train and val (from the feature cache where the backbone is the
    pretrained one), then milliseconds."""
    start = time.perf_counter()
    runtime = runtime.for_trained_model()  # fitted in the numerics that predict and serve will run it in
    images = len(splits.train) + len(splits.val)
    copy: list[torch.nn.Module] = []  # one inference copy for both splits, made only where a split is not cached

    def backbone() -> torch.nn.Module:  # (its weights are this run's: no OpenVINO graph kept on disk)
        copy or copy.append(runtime.inference_model(model, features=True, images=images, keep_graph=False))
        return copy[0]

    train, _ = outputs(model, splits.train, runtime=runtime, pre=pre, images=images, workers=workers, cache=True,
                       backbone=backbone)
    val, logits = outputs(model, splits.val, runtime=runtime, pre=pre, images=images, workers=workers, cache=True,
                          backbone=backbone)
    if not len(val.labels):
        return None
    cal = confidence.calibrate(logits, val.labels)  # T, kept only where it lowers the held-out ECE
    reference = confidence.reference_features(train.features)
    rejection = confidence.fit_rejection(confidence.nearest_similarity(val.features, reference),
                                         confidence.energy(logits, cal.temperature), false_rejection=false_rejection) \
        if len(val.labels) >= confidence.MIN_VALIDATION else None
    return ModelLimits(cal.temperature, cal.fitted, cal.ece_before, cal.ece_after, cal.ece_held_out,
                       confidence.reliability(logits.softmax(1), val.labels),
                       confidence.reliability((logits / cal.fitted).softmax(1), val.labels),
                       rejection, reference, len(val.labels), time.perf_counter() - start)
