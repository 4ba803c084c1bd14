"""The metrics of a classifier's predictions: accuracy, balanced accuracy, loss, per-class
precision/recall/F1, the confusion matrix and the expected calibration error."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from headstart.analysis.confidence import calibration_error


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
    ece: float | None = None  # expected calibration error of the softmax (confidence.calibration_error)

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
        ece=calibration_error(logits.float().softmax(1), labels),
    )
