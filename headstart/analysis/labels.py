"""Your labels, from the backbone features of the images (runtime/features.py).

- Likely mislabelled images (confident learning): out-of-fold probabilities of a linear head
  (linear.py, k-fold over the images), each image's label quality p(given label); an image is a
  suspect when another class's probability reaches that class's own threshold (the mean
  probability of the class over the images labelled with it), suggested as that class.
  `find_label_issues` is `headstart check DATA --labels`.
- `nearest`: the reference rows nearest by cosine similarity (similar images, the report's
  nearest training images).

Costs: one backbone pass per image (kept in the disk feature cache: a second call reads them
back), then matrix products and L-BFGS fits on (N, F) features: seconds for thousands of images.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from headstart.analysis.linear import FOLDS, digest, fit_head, fold_of_each_row, remembered, solve_head
from headstart.data import Columns, Sample, scan_dataset
from headstart.data.transforms import Preprocessing
from headstart.io.outputs import Kind, csv_with_header, write_output
from headstart.io.weights import weights_fingerprint
from headstart.models import create_model, get_model_info
from headstart.runtime.device import Runtime, resolve_runtime
from headstart.runtime.features import Features, extract_features
from headstart.runtime.inference import INFERENCE_BATCH_SIZE

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
    chosen by cross-validation on all images (linear.fit_head), then one fit per fold. The same
    inputs again (a second run on the same features, in one process) give the result made before."""
    key = digest(features, labels.long(), fit="out-of-fold", classes=classes, folds=folds, seed=seed)
    return remembered(key, lambda: _out_of_fold(features, labels, classes, folds, seed), torch.Tensor.clone)


def _out_of_fold(features: torch.Tensor, labels: torch.Tensor, classes: int, folds: int, seed: int) -> torch.Tensor:
    y = labels.long()
    l2 = fit_head(features, y, classes, seed=seed).l2
    x = features.double()
    fold = fold_of_each_row(y, torch.arange(len(y)), folds, seed)
    probs = torch.full((len(y), classes), 1.0 / classes, dtype=torch.float64)
    for k in range(folds):
        train, held = fold != k, fold == k
        if not held.any() or len(y[train].unique()) < 2:
            continue
        mu, sigma = x[train].mean(0), x[train].std(0).clamp(min=1e-6)
        W, b = solve_head((x[train] - mu) / sigma, y[train], classes, l2, None, None, 300)
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
