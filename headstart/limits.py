"""Your labels and your model's reach, from the backbone features of the images (features.py).

- Likely mislabelled images (confident learning): out-of-fold probabilities of a linear head
  (linear.py, k-fold over the images), each image's label quality p(given label); an image is a
  suspect when another class's probability reaches that class's own threshold (the mean
  probability of the class over the images labelled with it), suggested as that class.
  `find_label_issues` is `headstart check DATA --labels`.
- Similar images: the training images nearest by the cosine similarity of their features;
  `find_similar` is `headstart similar CKPT IMAGE... --in DATA`.
- Calibrated confidence and "none of these" (confidence.py's math): `fit_limits`, at the end of
  every run, fits the temperature and the unknown-image test on the validation split with the
  trained model's own features; `outputs` gives prediction the features and logits in one pass.

Costs: one backbone pass per image (kept in the disk feature cache: a second call reads them
back), then matrix products and L-BFGS fits on (N, F) features: seconds for thousands of images.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from . import confidence
from .data import Columns, DatasetSplits, Sample, collect_files, is_table, scan_dataset, table_split
from .features import Features, extract_features
from .inference import INFERENCE_BATCH_SIZE
from .linear import FOLDS, _folds, _solve, fit_head
from .models import create_model, get_head, get_model_info
from .outputs import Kind, csv_with_header, write_output
from .preprocessing import Preprocessing
from .runtime import Runtime, resolve_runtime
from .weights import weights_fingerprint

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Nearest training images.

def nearest(query: torch.Tensor, reference: torch.Tensor, *, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarities (Q, k), row indices (Q, k)) of the `k` rows of `reference` (R, F)
    nearest to each row of `query` (Q, F), most similar first. Cost: 2*Q*R*F FLOP."""
    if query.shape[0] == 0 or reference.shape[0] == 0:  # (no image decoded)
        return torch.zeros(query.shape[0], 0), torch.zeros(query.shape[0], 0, dtype=torch.long)
    sims = F.normalize(query.float(), dim=1) @ F.normalize(reference.float(), dim=1).T
    return sims.topk(min(k, reference.shape[0]), dim=1)


# ---------------------------------------------------------------------------------------------
# Likely mislabelled images.

@dataclass
class LabelIssue:
    index: int  # the image's position in the samples given
    given: int
    suggested: int  # the class the out-of-fold probabilities favour (given, where none does)
    quality: float  # out-of-fold probability of the given label: low is suspect
    suspect: bool  # another class reaches its own confidence threshold


def out_of_fold_probabilities(features: torch.Tensor, labels: torch.Tensor, classes: int, *, folds: int = FOLDS,
                              seed: int = 0) -> torch.Tensor:
    """(N, C) probabilities of each image from a linear head fitted without it: the L2 penalty
    chosen by cross-validation on all images (linear.fit_head), then one fit per fold."""
    y = labels.long()
    l2 = fit_head(features, y, classes, seed=seed).l2
    x = features.double()
    fold = _folds(y, torch.arange(len(y)), folds, seed)
    probs = torch.full((len(y), classes), 1.0 / classes, dtype=torch.float64)
    for k in range(folds):
        train, held = fold != k, fold == k
        if not held.any() or len(y[train].unique()) < 2:
            continue
        mu, sigma = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
        W, b = _solve((x[train] - mu) / sigma, y[train], classes, l2, None, None, 300)
        probs[held] = (((x[held] - mu) / sigma) @ W.T + b).softmax(1)
    return probs.float()


def label_issues(features: torch.Tensor, labels: torch.Tensor, classes: int, *, folds: int = FOLDS,
                 seed: int = 0) -> list[LabelIssue]:
    """Every image, most suspect first: suspects (confident learning's off-diagonal) before the
    rest, each group by label quality, lowest first."""
    p = out_of_fold_probabilities(features, labels, classes, folds=folds, seed=seed)
    y = labels.long()
    thresholds = torch.stack([p[y == c, c].mean() if (y == c).any() else torch.tensor(1.0) for c in range(classes)])
    above = p >= thresholds  # (N, C): classes each image is confidently in
    above[torch.arange(len(y)), y] = False
    out = []
    for i in range(len(y)):
        others = above[i].nonzero().flatten()
        suggested = int(others[p[i, others].argmax()]) if len(others) else int(p[i].argmax())
        out.append(LabelIssue(i, int(y[i]), suggested, float(p[i, y[i]]), bool(len(others))))
    return sorted(out, key=lambda r: (not r.suspect, r.quality))


# ---------------------------------------------------------------------------------------------
# The commands' library calls.

@dataclass
class LabelRow:
    """An image of `find_label_issues`' ranking."""

    path: str
    split: str  # train | val
    given: str
    suggested: str
    quality: float  # out-of-fold probability of the given label
    suspect: bool

    def to_dict(self, rank: int) -> dict[str, Any]:
        return {"rank": rank, "path": self.path, "split": self.split, "given": self.given,
                "suggested": self.suggested, "label_quality": round(self.quality, 6), "suspect": int(self.suspect)}


LABEL_COLUMNS = ["rank", "path", "split", "given", "suggested", "label_quality", "suspect"]
LABEL_CSV = Kind("a label-quality CSV written by headstart check", csv_with_header(LABEL_COLUMNS))


def write_label_csv(path: str | os.PathLike[str], rows: Sequence[LabelRow], *, overwrite: bool = False) -> Path:
    """`check --labels --csv FILE`: every image's label quality, most suspect first. Replaces only
    such a CSV (outputs.claim), unless `overwrite`."""
    with write_output(path, LABEL_CSV, mode="w", overwrite=overwrite) as f:
        w = csv.DictWriter(f, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(r.to_dict(i) for i, r in enumerate(rows, 1))
    return Path(path)


def _features(model: torch.nn.Module, samples: Sequence[Sample], *, arch: str, pre: Preprocessing, runtime: Runtime,
              images: int, workers: int, on_batch: Callable[[int, int], None] | None = None) -> Features:
    """Backbone features of `samples` (view 0), through the disk feature cache that training uses
    (the same key: a run's frozen or auto strategy reads them back, and the other way round)."""
    fingerprint = weights_fingerprint(model, exclude=f"{get_model_info(arch).classifier}.")
    return extract_features(model, samples, runtime=runtime, pre=pre, cache_key=fingerprint, images=images,
                            batch_size=INFERENCE_BATCH_SIZE, workers=workers, on_batch=on_batch)


def find_label_issues(data: str | os.PathLike[str], *, arch: str = "resnet50", weights: str = "imagenet",
                      val_split: float | None = None, columns: Columns | None = None, folds: int = FOLDS,
                      seed: int = 0, device: str = "auto", precision: str = "auto", threads: int | None = None,
                      workers: int = 2,
                      on_batch: Callable[[int, int], None] | None = None) -> list[LabelRow]:
    """Every decodable image of `data` (its train/ and val/ pooled), most suspect first: the
    suspects (another class is confidently more likely) by label quality, then the rest. Needs a
    pretrained backbone (`weights`, ImageNet by default): its features are what the labels are
    checked against."""
    if weights in (None, "none"):
        raise ValueError("checking labels needs a pretrained backbone: its features are what the labels are checked "
                         "against; drop --weights none (ImageNet weights are the default)")
    splits = scan_dataset(data, val_split=val_split, seed=seed, columns=columns)
    runtime = resolve_runtime(device=device, precision=precision, threads=threads)
    torch.manual_seed(seed)
    model = create_model(arch, num_classes=len(splits.classes), weights=weights)
    runtime.prepare(model)
    images = len(splits.train) + len(splits.val)
    pre = get_model_info(arch).preprocessing
    parts = [(name, samples, _features(model, samples, arch=arch, pre=pre, runtime=runtime, images=images,
                                       workers=workers, on_batch=on_batch))
             for name, samples in (("train", splits.train), ("val", splits.val))]
    rows = [(name, samples[int(i)]) for name, samples, f in parts for i in f.indices]
    features = torch.cat([f.features for _, _, f in parts])
    labels = torch.cat([f.labels for _, _, f in parts])
    ranked = label_issues(features, labels, len(splits.classes), folds=folds, seed=seed)
    names = splits.classes
    return [LabelRow(str(rows[r.index][1].path), rows[r.index][0], names[r.given], names[r.suggested], r.quality,
                     r.suspect) for r in ranked]


@dataclass
class SimilarImage:
    path: str
    label: str
    similarity: float  # cosine similarity of the backbone features, 1 = the same


@dataclass
class SimilarImages:
    path: str  # the query image
    nearest: list[SimilarImage]  # most similar first; empty when the image could not be read
    error: str | None = None


def find_similar(checkpoint: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], *,
                 data: str | os.PathLike[str], k: int = 5, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, workers: int = 2, arch: str | None = None,
                 columns: Columns | None = None) -> list[SimilarImages]:
    """For each image under `images`, the `k` training images of `data` (its train/ folder, or the
    folder itself, or a table's train rows: `columns`) nearest by the checkpoint's backbone features (cosine), from the disk feature
    cache when they are there. The model runs as `classifier.load` opens it."""
    from .classifier import load

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    model = load(checkpoint, device=device, precision=precision, threads=threads, reject="off", arch=arch,
                 features=True)
    root = Path(data)
    if is_table(root):  # its train rows (every row where it has no split column)
        names, train = table_split(root, "train", columns=columns)
    elif (root / "train").is_dir():
        splits = scan_dataset(root, val_split=None)
        names, train = splits.classes, splits.train
    else:
        names, train = None, [Sample(p, 0) for p in collect_files([root])]
    files = collect_files(images)
    ref = model.features([s.path for s in train], cache=True, workers=workers)
    query = model.features(files, cache=True, workers=workers)
    if not len(ref.indices):
        raise ValueError(f"no readable training images under {root}")
    sims, idx = nearest(query.features, ref.features, k=k)

    def label(s: Sample) -> str:
        return names[s.label] if names else Path(s.path).parent.name

    out = {int(q): SimilarImages(str(files[int(q)]), [
        SimilarImage(str(train[int(ref.indices[j])].path), label(train[int(ref.indices[j])]), float(v))
        for v, j in zip(srow, irow)]) for q, srow, irow in zip(query.indices, sims, idx)}
    for q, reason in query.failed:
        out[q] = SimilarImages(str(files[q]), [], f"not a readable image ({reason})")
    return [out[i] for i in sorted(out)]


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
