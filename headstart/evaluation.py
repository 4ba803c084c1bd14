"""Running a model over a loader, and the metrics of its predictions."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import open_model
from .data import Batch, ImageDataset, Sample, find_classes, make_loader, make_samples
from .preprocessing import Preprocessing
from .runtime import Runtime, resolve_runtime


@dataclass
class Inference:
    logits: torch.Tensor  # float32 (N, C), for the images that decoded
    labels: torch.Tensor  # int64 (N,)
    indices: torch.Tensor  # int64 (N,): positions in the dataset
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason)


def run_inference(model: nn.Module, loader: torch.utils.data.DataLoader, runtime: Runtime,
                  pre: Preprocessing, *, on_batch: Callable[[int, int], None] | None = None) -> Inference:
    """Logits for every decodable image of `loader` (model in eval mode); `on_batch(step, steps)`
    after each batch is read (OpenVINO has a few more batches in flight than were answered)."""
    model.eval()
    logits, labels, indices, failed = [], [], [], []

    def inputs() -> Iterator[tuple[Batch, torch.Tensor]]:
        for step, batch in enumerate(loader):
            failed.extend(batch.failed)
            if len(batch):
                yield batch, runtime.inputs(batch.images, pre)
            if on_batch:
                on_batch(step + 1, len(loader))

    for batch, out in runtime.outputs(model, inputs()):
        logits.append(out)
        labels.append(batch.labels)
        indices.append(batch.indices)
    if not logits:
        return Inference(torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), failed)
    return Inference(torch.cat(logits), torch.cat(labels), torch.cat(indices), failed)


@dataclass
class ClassMetrics:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class Metrics:
    accuracy: float
    balanced_accuracy: float  # mean recall over classes that have examples
    loss: float
    per_class: list[ClassMetrics]
    confusion: list[list[int]]  # confusion[true][pred]
    n: int
    skipped: list[str] = field(default_factory=list)  # files that could not be decoded

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Metrics":
        return cls(**{**d, "per_class": [ClassMetrics(**c) for c in d["per_class"]]})


def confusion_matrix(labels: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    idx = labels.long() * num_classes + preds.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def compute_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> Metrics:
    """Accuracy, balanced accuracy, mean cross-entropy, per-class P/R/F1 and the confusion matrix."""
    k = len(classes)
    n = int(labels.numel())
    if n == 0:
        return Metrics(0.0, 0.0, float("nan"), [ClassMetrics(c, 0.0, 0.0, 0.0, 0) for c in classes],
                       [[0] * k for _ in range(k)], 0)
    preds = logits.argmax(1)
    cm = confusion_matrix(labels, preds, k)
    tp = cm.diag().double()
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-12),
                     torch.zeros_like(tp))
    per_class = [ClassMetrics(c, float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
                 for i, c in enumerate(classes)]
    present = support > 0
    return Metrics(
        accuracy=float(tp.sum() / n),
        balanced_accuracy=float(recall[present].mean()),
        loss=float(F.cross_entropy(logits.float(), labels)),
        per_class=per_class,
        confusion=cm.tolist(),
        n=n,
    )


def evaluate(checkpoint: str | os.PathLike[str], data: str | os.PathLike[str], *, batch_size: int = 32,
             workers: int = 2, precision: str = "auto", device: str = "auto",
             threads: int | None = None, compile: bool = False, engine: str = "auto", arch: str | None = None,
             classes: str | list[str] | None = None) -> Metrics:
    """Metrics of a checkpoint on a class-per-folder dataset: `data` itself, or its `val/` folder.

    Class folders are matched to the checkpoint's classes by name; a class the checkpoint does not
    know is an error. `checkpoint` may also be a weights file with its head (a MindSpore .ckpt...):
    its classes are then `classes` if given, else the class folders in sorted order.
    """
    folder = Path(data)
    if (folder / "val").is_dir():
        folder = folder / "val"
    present = find_classes(folder)
    ckpt = open_model(checkpoint, arch=arch, classes=classes, default_classes=present)
    unknown = sorted(set(present) - set(ckpt.classes))
    if unknown:
        raise ValueError(
            f"class folder(s) {unknown} in {folder} are not classes of the checkpoint {ckpt.classes}"
        )
    samples = [Sample(s.path, ckpt.classes.index(present[s.label])) for s in make_samples(folder, present)]
    runtime = resolve_runtime(device=device, precision=precision, threads=threads, compile=compile, engine=engine)
    model = runtime.inference_model(ckpt.model, images=len(samples))
    loader = make_loader(ImageDataset(samples, ckpt.preprocessing.eval_transform()), batch_size=batch_size,
                         shuffle=False, workers=workers)
    inf = run_inference(model, loader, runtime, ckpt.preprocessing)
    metrics = compute_metrics(inf.logits, inf.labels, ckpt.classes)
    metrics.skipped = [str(samples[i].path) for i, _ in inf.failed]
    return metrics
