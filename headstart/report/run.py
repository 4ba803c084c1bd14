"""The files of a finished run besides its checkpoints and run state: predictions.csv, the
pictures (top_losses.png, predictions.png, curves.png, reliability.png, the label check's), then
summary.json and report.html (page.py) rendered from them. io/runfolder.py lists them."""

from __future__ import annotations

import csv
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from headstart.analysis.limits import ModelLimits
from headstart.data import DatasetSplits, ImageDataset, collate
from headstart.data.transforms import Preprocessing
from headstart.io.download import atomic_write
from headstart.io.runfolder import write_summary
from headstart.io.runstate import EpochRecord
from headstart.report.page import write_report
from headstart.runtime.features import Features
from headstart.runtime.inference import Inference


def write_val_pictures(out: Path, inf: Inference, splits: DatasetSplits, pre: Preprocessing, *,
                       temperature: float = 1.0) -> dict[str, Path]:
    """predictions.csv (every validation image), top_losses.png (the most confidently wrong) and
    predictions.png (a spread of validation images, titled with the predicted class). Probabilities
    and losses are those of the logits divided by `temperature` (the run's calibration), as predict
    gives them."""
    from headstart.report import plots  # matplotlib is imported only when pictures are drawn

    logits = inf.outputs.float() / temperature
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    losses = F.cross_entropy(logits, inf.labels, reduction="none")
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


def write_label_pictures(out: Path, features: tuple[Features, Features], inf: Inference, splits: DatasetSplits,
                         pre: Preprocessing, *, shown: int = 12, neighbours: int = 3) -> tuple[dict[str, Path], dict]:
    """From the pretrained backbone's features (analysis/labels.py): label_issues.csv (every training image's
    label quality, most suspect first), label_issues.png (the suspects, given and suggested label)
    and top_losses_nearest.png (each of the most confidently wrong validation images beside its
    nearest training images). Returns ({name: path}, what summary.json says of them)."""
    from headstart.analysis.labels import label_issues, nearest
    from headstart.report import plots

    train, val = features
    first = int(train.indices.unique().numel())  # view 0's rows come first, one per decodable image
    x, y, where = train.features[:first], train.labels[:first], train.indices[:first]
    ranked = label_issues(x, y, len(splits.classes))
    classes = splits.classes
    with atomic_write(out / "label_issues.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(["rank", "path", "given", "suggested", "label_quality", "suspect"])
        for k, r in enumerate(ranked, 1):
            w.writerow([k, str(splits.train[int(where[r.index])].path), classes[r.given], classes[r.suggested],
                        f"{r.quality:.6f}", int(r.suspect)])

    def images(samples: list) -> torch.Tensor:
        ds = ImageDataset(samples, pre.eval_transform())
        return collate([ds[k] for k in range(len(ds))]).images

    suspects = [r for r in ranked if r.suspect][:shown]
    files = {"label_issues_csv": out / "label_issues.csv"}
    files["label_issues"] = plots.save_titled_grid(
        out / "label_issues.png", images([splits.train[int(where[r.index])] for r in suspects]),
        [f"given: {classes[r.given]}\nsuggested: {classes[r.suggested]} ({r.quality:.2f})" for r in suspects],
        ["red"] * len(suspects), empty="no training label looks wrong")
    # The most confidently wrong validation images (as top_losses.png), each with its nearest training images.
    pred = inf.outputs.argmax(1)
    losses = F.cross_entropy(inf.outputs.float(), inf.labels, reduction="none")
    wrong = sorted((i for i in range(len(pred)) if int(pred[i]) != int(inf.labels[i])), key=lambda i: -float(losses[i]))
    row_of = {int(index): row for row, index in enumerate(val.indices.tolist())}
    wrong = [i for i in wrong if int(inf.indices[i]) in row_of][:6]
    samples, titles, colours = [], [], []
    if wrong:
        q = val.features[[row_of[int(inf.indices[i])] for i in wrong]]
        sims, idx = nearest(q, x, k=neighbours)
        for i, srow, irow in zip(wrong, sims.tolist(), idx.tolist()):
            samples.append(splits.val[int(inf.indices[i])])
            titles.append(f"true: {classes[int(inf.labels[i])]}\npredicted: {classes[int(pred[i])]}")
            colours.append("red")
            for sim, j in zip(srow, irow):
                samples.append(splits.train[int(where[j])])
                titles.append(f"train: {classes[int(y[j])]}\nsimilarity {sim:.2f}")
                colours.append("black")
    files["top_losses_nearest"] = plots.save_titled_grid(
        out / "top_losses_nearest.png", images(samples), titles, colours, cols=neighbours + 1,
        empty="no validation image is misclassified")
    return files, {"checked": len(ranked), "suspects": sum(r.suspect for r in ranked),
                   "top": [{"path": str(splits.train[int(where[r.index])].path), "given": classes[r.given],
                            "suggested": classes[r.suggested], "quality": r.quality} for r in suspects]}


def write_run_files(out: Path, *, inf: Inference, splits: DatasetSplits, pre: Preprocessing,
                    history: Sequence[EpochRecord], summary: dict[str, Any],
                    features: tuple[Features, Features] | None = None,
                    limits: ModelLimits | None = None) -> dict[str, Path]:
    """The pictures, curves, summary.json and report.html of a finished run; {name: path}. With
    the pretrained backbone's `features` (strategies that computed them), the label check and the
    top losses' nearest training images too."""
    from headstart.report import plots

    files = write_val_pictures(out, inf, splits, pre, temperature=limits.temperature if limits else 1.0)
    if features is not None:
        more, summary["label_issues"] = write_label_pictures(out, features, inf, splits, pre)
        files.update(more)
    if limits is not None:
        files["reliability"] = plots.save_reliability(out / "reliability.png", limits.reliability_before,
                                                      limits.reliability_after, temperature=limits.fitted,
                                                      ece=(limits.ece_before, limits.ece_after))
    files["curves"] = plots.save_curves(out / "curves.png", [asdict(r) for r in history])
    files["summary"] = write_summary(out, summary)
    files["report"] = write_report([out])
    return files
