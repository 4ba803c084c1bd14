"""What a run folder holds besides checkpoints and the run state: metrics.csv, the validation
pictures and predictions, the curves, summary.json, and the report rendered from them.

    metrics.csv        one row per epoch (written after every epoch)
    predictions.csv    every validation image: true, predicted, probability, loss
    top_losses.png     the most confidently wrong validation images
    predictions.png    a spread of validation images titled with the prediction, blue right, red wrong
    curves.png         loss and accuracy per epoch
    summary.json       classes, counts, config, best metrics, history, skipped files, wall time
    report.html        all of it in one page (report.py)
    dataset.json       the files the run started with (a resumed run checks them)
    .headstart-run     marks the folder as a run: never overwritten by accident, never read as a class
    .headstart-lock    held (a POSIX record lock) by the process training into the folder

`claim_run_folder` takes a folder for a run: never one inside the dataset, never one that holds
another run unless asked (resume, overwrite), never one another process is training into.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from .data import RUN_MARKER, Columns, DatasetSplits, ImageDataset, collate, holds_runs, is_table, scan_dataset
from .download import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the other checks still hold
    fcntl = None  # type: ignore[assignment]

LOCK = ".headstart-lock"
DATASET_FILE = "dataset.json"
# What a run writes; --overwrite removes these (and nothing else a user put into the folder).
RUN_FILES = ("best.safetensors", "best.json", "last.safetensors", "last.json", "state.safetensors", "metrics.csv",
             "summary.json", "predictions.csv", "predictions.png", "top_losses.png", "curves.png", "report.html",
             "label_issues.csv", "label_issues.png", "top_losses_nearest.png", "reliability.png", DATASET_FILE)


def holds_run(folder: Path) -> bool:
    """Whether `folder` holds a headstart run that saved something (a state, a checkpoint, a summary);
    one that stopped before its first epoch ended (a dataset error, say) holds nothing to lose."""
    return any((folder / name).exists() for name in ("state.safetensors", "best.safetensors", "summary.json"))


def default_run_folder(data: str | os.PathLike[str], name: str, *, root: str | os.PathLike[str] = "runs") -> Path:
    """`<root>/<name>`, or `<name>-2`, `-3`... if that holds a run already; `root` moves beside the
    dataset when it would be inside it (training from within a flat dataset: `cd data && headstart
    train .`)."""
    data, base = Path(data).resolve(), Path(root)
    if _inside(base.resolve(), data):
        base = data.parent / "runs"
    folder, n = base / name, 1
    while holds_run(folder) or holds_runs(folder):
        n += 1
        folder = base / f"{name}-{n}"
    return folder


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


@contextlib.contextmanager
def claim_run_folder(out: Path, *, data: str | os.PathLike[str], resume: bool = False,
                     overwrite: bool = False) -> Iterator[Path]:
    """Hold `out` for one run while the block runs. Refused (FileExistsError / ValueError, naming
    the fix): a folder inside the dataset; a folder that holds another run, unless `resume` (it must
    then hold a run state) or `overwrite` (its run's files are removed first); a folder another
    process holds; a folder that is not a run but holds files of the names a run writes, unless
    `overwrite`. The lock is a POSIX record lock held by this process alone (not by its data-loading
    workers), which the kernel drops when the process ends, killed or not."""
    out = Path(out)
    if _inside(out.resolve(), Path(data).resolve()):
        raise ValueError(f"the run folder {out} is inside the dataset {data}: its pictures would be read as images "
                         "next time; pass --out outside the dataset")
    if resume and not (out / "state.safetensors").exists():
        raise FileNotFoundError(f"{out} has no run state (state.safetensors) to resume: the run stopped before it "
                                "first saved one. Start it again, without --resume")
    clashes = [name for name in RUN_FILES if (out / name).exists()] if not (out / RUN_MARKER).exists() else []
    if clashes and not overwrite:
        raise FileExistsError(f"{out} is not a run folder, and it holds files of the names a run writes "
                              f"({', '.join(clashes[:4])}{' ...' if len(clashes) > 4 else ''}): they are left as they "
                              "are. Pass another --out (e.g. a new folder), or --overwrite to replace them")
    if not resume and holds_run(out) and not overwrite:
        raise FileExistsError(f"{out} holds a run already: resume it (--resume {out}), pass another --out, or "
                              "--overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise type(e)(e.errno, f"cannot make the run folder {out}: {e.strerror or e}. Pass --out with a folder you "
                               "can write") from e
    with open(out / LOCK, "a+") as lock:
        if fcntl is not None:
            # A POSIX record lock (lockf): held by this process alone. (An flock would be shared with the data
            # loader's forked worker processes, which can outlive a killed run for a moment and keep a resume out.)
            try:
                fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0)
                pid = lock.read().strip() or "?"
                raise FileExistsError(f"another process (pid {pid}) is training into {out}: wait for it to end, or "
                                      "pass another --out") from None
            lock.truncate(0)
            lock.write(str(os.getpid()))
            lock.flush()
        if overwrite and not resume:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
        if not (out / RUN_MARKER).exists():
            with atomic_write(out / RUN_MARKER, "w") as f:
                json.dump({"created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        try:
            yield out
        finally:
            if fcntl is not None:
                fcntl.lockf(lock, fcntl.LOCK_UN)


def dataset_listing(splits: DatasetSplits) -> dict[str, list[list[Any]]]:
    """{split: [[path relative to the dataset, size in bytes], ...]} of the files a run reads; for a
    table of labels, paths relative to its folder, and {"table": its sha256} (a label changed is a
    change too)."""
    out: dict[str, Any] = {}
    table = is_table(splits.root)
    base = splits.root.parent if table else splits.root
    for split, samples in (("train", splits.train), ("val", splits.val)):
        rows = []
        for s in samples:
            try:
                size = s.path.stat().st_size
            except OSError:
                size = -1
            rows.append([os.path.relpath(s.path, base), size])
        out[split] = sorted(rows)
    if table:
        out["table"] = hashlib.sha256(splits.root.read_bytes()).hexdigest()
    return out


def check_dataset_unchanged(out: Path, splits: DatasetSplits) -> None:
    """On resume: ValueError saying what changed in the dataset since the run started (files added,
    removed, changed in size), so the run does not go on with other data without a word."""
    path = out / DATASET_FILE
    if not path.exists():  # a run from before this check
        return
    before = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    now = dataset_listing(splits)
    changes = []
    for split in ("train", "val"):
        old, new = dict(map(tuple, before.get(split, []))), dict(map(tuple, now[split]))
        added, removed = sorted(set(new) - set(old)), sorted(set(old) - set(new))
        resized = sorted(p for p in set(old) & set(new) if old[p] != new[p])
        for what, paths in (("added", added), ("removed", removed), ("changed", resized)):
            if paths:
                shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
                changes.append(f"{len(paths)} {what} in {split} ({shown})")
    if before.get("table") != now.get("table"):
        changes.append(f"the table {splits.root} itself (its labels, splits or rows)")
    if changes:
        raise ValueError(f"the dataset {splits.root} changed since the run {out} started: {'; '.join(changes)}. "
                         "Resuming would train on other data: put the files back, or start a new run")


def write_dataset_listing(out: Path, splits: DatasetSplits) -> None:
    with atomic_write(out / DATASET_FILE, "w") as f:
        json.dump(dataset_listing(splits), f)
from .features import Features
from .inference import Inference
from .preprocessing import Preprocessing
from .report import write_report
from .runstate import EpochRecord

if TYPE_CHECKING:
    from .limits import ModelLimits


def clear_temporaries(folder: Path) -> None:
    """Remove the temporary files a run killed in the middle of an atomic write left (those of the
    files a run writes, download.atomic_write's names: nothing else)."""
    for name in (*RUN_FILES, RUN_MARKER):
        for stale in folder.glob(f".{glob.escape(name)}.*.tmp"):
            stale.unlink(missing_ok=True)


def write_metrics_csv(path: Path, history: Sequence[EpochRecord]) -> Path:
    with atomic_write(path, "w") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(history[0])))
        w.writeheader()
        for r in history:
            w.writerow(asdict(r))
    return path


def write_val_pictures(out: Path, inf: Inference, splits: DatasetSplits, pre: Preprocessing, *,
                       temperature: float = 1.0) -> dict[str, Path]:
    """predictions.csv (every validation image), top_losses.png (the most confidently wrong) and
    predictions.png (a spread of validation images, titled with the predicted class). Probabilities
    and losses are those of the logits divided by `temperature` (the run's calibration), as predict
    gives them."""
    from . import plots  # matplotlib is imported only when pictures are drawn

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
    """From the pretrained backbone's features (limits.py): label_issues.csv (every training image's
    label quality, most suspect first), label_issues.png (the suspects, given and suggested label)
    and top_losses_nearest.png (each of the most confidently wrong validation images beside its
    nearest training images). Returns ({name: path}, what summary.json says of them)."""
    from . import plots
    from .limits import label_issues, nearest

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
    from . import plots

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


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    with atomic_write(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return out / "summary.json"


def run_splits(checkpoint: str | os.PathLike[str]) -> DatasetSplits | None:
    """The dataset splits of the run `checkpoint` was saved in, when its summary and dataset are at hand."""
    summary = Path(checkpoint).parent / "summary.json"
    if not summary.is_file():
        return None
    try:
        s = json.loads(summary.read_text(encoding="utf-8", errors="surrogateescape"))
        c = s["config"]
        return scan_dataset(s["data"], val_split=c.get("val_split"), seed=c.get("seed", 0),
                            columns=Columns(c.get("path_column"), c.get("label_column"), c.get("allow_outside", False)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
