"""A run folder: what it holds, and the files of it read and written here (the run state's format is
io/runstate.py's, the checkpoints' io/checkpoint.py's, the pictures' and report's report/run.py's).

    best.safetensors   the best epoch's model (+ best.json), written by training/loop.py
    last.safetensors   the last epoch's (+ last.json)
    state.safetensors  what `--resume` continues from (io/runstate.py)

    metrics.csv        one row per epoch (written after every epoch)
    predictions.csv    every validation image: true, predicted, probability, loss
    top_losses.png     the most confidently wrong validation images
    predictions.png    a spread of validation images titled with the prediction, blue right, red wrong
    curves.png         loss and accuracy per epoch
    summary.json       classes, counts, config, best metrics, history, skipped files, wall time
    report.html        all of it in one page (report/page.py)
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

from headstart.data import RUN_MARKER, Columns, DatasetSplits, holds_runs, is_table, scan_dataset
from headstart.io.download import atomic_write

if TYPE_CHECKING:  # (a run state's rows: this module reads and writes files, and loads no torch)
    from headstart.io.runstate import EpochRecord

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


def write_summary(out: Path, summary: dict[str, Any]) -> Path:
    with atomic_write(out / "summary.json", "w") as f:
        json.dump(summary, f, indent=2)
    return out / "summary.json"


def run_splits(checkpoint: str | os.PathLike[str]) -> DatasetSplits | None:
    """The dataset splits of the run `checkpoint` was saved in, when its summary and dataset are at hand."""
    try:
        s = read_summary(Path(checkpoint).parent)
        c = s["config"]
        return scan_dataset(s["data"], val_split=c.get("val_split"), seed=c.get("seed", 0),
                            columns=Columns(c.get("path_column"), c.get("label_column"), c.get("allow_outside", False)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


SUMMARY_KEYS = ("data", "classes", "counts", "config", "best_epoch", "best_metrics", "history", "wall_time_s")


def read_summary(run: str | os.PathLike[str]) -> dict[str, Any]:
    """A run folder's summary.json, with its folder; FileNotFoundError naming the fix."""
    run = Path(run)
    path = run / "summary.json"
    if not path.is_file():
        if (run / "state.safetensors").is_file():
            raise FileNotFoundError(f"{run} is a run that was interrupted before it ended (it has a run state but no "
                                    f"summary.json yet): finish it with `headstart train --resume {run}`; its report "
                                    "is written at the end")
        raise FileNotFoundError(f"no summary.json in {run}: pass a run folder written by `headstart train`")
    try:
        summary = json.loads(path.read_text(encoding="utf-8", errors="surrogateescape"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    missing = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it was not written by `headstart train` (or by an "
                         f"older headstart); train again, or pass a run folder that has them")
    summary["_folder"] = run
    return summary
