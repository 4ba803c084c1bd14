"""What a run folder holds besides checkpoints and the run state: metrics.csv, the validation
pictures and predictions, the curves, summary.json, and the report rendered from them.

    metrics.csv        one row per epoch (written after every epoch)
    predictions.csv    every validation image: true, predicted, probability, loss
    top_losses.png     the most confidently wrong validation images
    predictions.png    a spread of validation images titled with the prediction, blue right, red wrong
    curves.png         loss and accuracy per epoch
    summary.json       classes, counts, config, best metrics, history, skipped files, wall time
    report.html        all of it in one page (report.py)
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import DatasetSplits, ImageDataset, collate
from .download import atomic_write
from .inference import Inference
from .preprocessing import Preprocessing
from .report import write_report
from .runstate import EpochRecord


def clear_temporaries(folder: Path) -> None:
    """Remove the temporary files a process killed in the middle of an atomic write left."""
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def write_metrics_csv(path: Path, history: Sequence[EpochRecord]) -> Path:
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(history[0])))
        w.writeheader()
        for r in history:
            w.writerow(asdict(r))
    return path


def write_val_pictures(out: Path, inf: Inference, splits: DatasetSplits, pre: Preprocessing) -> dict[str, Path]:
    """predictions.csv (every validation image), top_losses.png (the most confidently wrong) and
    predictions.png (a spread of validation images, titled with the predicted class)."""
    from . import plots  # matplotlib is imported only when pictures are drawn

    probs = inf.outputs.float().softmax(1)
    pred = probs.argmax(1)
    losses = F.cross_entropy(inf.outputs.float(), inf.labels, reduction="none")
    rows = []
    for i, index in enumerate(inf.indices.tolist()):
        rows.append({"path": str(splits.val[index].path), "true": splits.classes[int(inf.labels[i])],
                     "predicted": splits.classes[int(pred[i])], "probability": f"{float(probs[i, pred[i]]):.6f}",
                     "loss": f"{float(losses[i]):.6f}"})
    with atomic_write(out / "predictions.csv", "w") as f:
        w = csv.DictWriter(f, fieldnames=["path", "true", "predicted", "probability", "loss"])
        w.writeheader()
        w.writerows(rows)

    def images(rows_idx: list[int]) -> torch.Tensor:
        ds = ImageDataset([splits.val[int(inf.indices[i])] for i in rows_idx], pre.eval_transform())
        return collate([ds[k] for k in range(len(ds))]).images

    wrong = [i for i in range(len(rows)) if int(pred[i]) != int(inf.labels[i])]
    wrong = sorted(wrong, key=lambda i: -float(losses[i]))[:12]
    titles = [f"true: {rows[i]['true']}\npredicted: {rows[i]['predicted']} {float(rows[i]['probability']):.2f}"
              for i in wrong]
    files = {"predictions_csv": out / "predictions.csv"}
    files["top_losses"] = plots.save_titled_grid(out / "top_losses.png", images(wrong), titles,
                                                 ["red"] * len(wrong), empty="no validation image is misclassified")
    picks = plots.spread_indices(len(rows), 18)
    files["predictions"] = plots.save_prediction_grid(
        out / "predictions.png", images(picks), [int(inf.labels[i]) for i in picks], [int(pred[i]) for i in picks],
        splits.classes)
    return files


def write_run_files(out: Path, *, inf: Inference, splits: DatasetSplits, pre: Preprocessing,
                    history: Sequence[EpochRecord], summary: dict[str, Any]) -> dict[str, Path]:
    """The pictures, curves, summary.json and report.html of a finished run; {name: path}."""
    from . import plots

    files = write_val_pictures(out, inf, splits, pre)
    files["curves"] = plots.save_curves(out / "curves.png", [asdict(r) for r in history])
    files["summary"] = out / "summary.json"
    with atomic_write(files["summary"], "w") as f:
        json.dump(summary, f, indent=2)
    files["report"] = write_report([out])
    return files
