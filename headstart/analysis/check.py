"""Findings, worst first:
- error: training would be wrong (a class missing from a split, an empty class folder, the same
  image in train and val: leakage; in a table of labels, a file listed with two labels, or in
  train and in val). `headstart check` exits non-zero unless `--allow` names them.
- warning: likely a problem (undecodable files, duplicates within a split, likely placeholders,
  tiny images, images over Pillow's decompression-bomb guard, hidden folders; a table's rows whose
  file is missing, or a row listed twice).
- info: handled automatically (modes converted to RGB, EXIF rotation applied, non-image files).

Each file's own checks and the duplicates among them are files.py's.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

from headstart.analysis.files import FileInfo, Finding, duplicate_findings, file_findings, inspect_file
from headstart.data import Columns, is_image_file, is_table, list_images, read_table, refuse_val_split, table_repeats
from headstart.io.outputs import Kind, json_by, write_output
from headstart.version import __version__

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}


BLOCKING = ("class-missing", "empty-class", "no-classes", "leakage", "no-split", "conflicting-labels")  # kinds that make training wrong


@dataclass
class CheckReport:
    root: str
    splits: list[str]
    classes: list[str]
    counts: dict[str, dict[str, int]]
    findings: list[Finding]
    files: int
    seconds: dict[str, float] = field(default_factory=dict)  # reading every file; the duplicate search

    def blocking(self, allow: Iterable[str] = ()) -> list[Finding]:
        """The errors that make training wrong, but for the kinds in `allow` (each one of BLOCKING)."""
        allowed = {k.strip() for k in allow if k.strip()}
        unknown = sorted(allowed - set(BLOCKING))
        if unknown:
            raise ValueError(f"--allow {','.join(unknown)}: not a kind of error the check reports; the kinds are "
                             f"{', '.join(BLOCKING)}")
        return [f for f in self.findings if f.severity == "error" and f.kind not in allowed]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# Layout.

def _layout(root: Path, val_split: float | None) -> tuple[dict[str, Path], list[Finding]]:
    """{split: folder}: train/ and val/ when present, else the root itself as one split."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    findings = []
    hidden = sorted(str(p) for p in root.iterdir() if p.is_dir() and p.name.startswith("."))
    if (root / "train").is_dir():
        splits = {"train": root / "train"}
        if (root / "val").is_dir():
            refuse_val_split(root, val_split)
            splits["val"] = root / "val"
        elif val_split is None:
            findings.append(Finding("error", "class-missing", f"{root} has train/ but no val/: add one, or pass "
                                                              "--val-split 0.2", [str(root / "val")]))
    else:
        splits = {"all": root}
    if hidden:
        findings.append(Finding("warning", "hidden", "hidden folders are ignored (not classes)", hidden))
    return splits, findings


def _table_layout(table: Path, val_split: float | None, columns: Columns
                  ) -> tuple[dict[str, list[str]], list[FileInfo], list[Finding]]:
    """({split: classes}, the files to inspect, findings) of a table of labels: rows whose file is
    missing, files listed twice (with other labels, in both splits, or the same row again). A table
    that cannot be read (no such column, an empty label...) is a ValueError naming the row."""
    rows, has_split = read_table(table, columns)
    findings = []
    if not rows:
        findings.append(Finding("error", "no-classes", f"{table} lists no images: a header with a path and a label "
                                                       "column, then a row per image", [str(table)]))
    elif len({r.label for r in rows}) < 2:
        findings.append(Finding("error", "no-classes", f"{table} labels every image {rows[0].label!r}: a classifier "
                                                       "needs at least two classes", [str(table)]))
    if has_split:
        refuse_val_split(table, val_split, what="a split column")
    elif val_split is None:
        findings.append(Finding("error", "no-split", f"{table} has no split column: add one (split: train/val, or "
                                                     "is_valid: True/False), or pass --val-split 0.2", [str(table)]))
    repeated = set()
    for a, b in table_repeats(rows):
        repeated.add(id(b))
        where = f"{b.path} (rows {a.line} and {b.line})"
        if a.label != b.label:
            findings.append(Finding("error", "conflicting-labels", f"listed twice with different labels, {a.label!r} "
                                    f"and {b.label!r}: training refuses the table; keep the right row", [where]))
        elif a.split != b.split:
            findings.append(Finding("error", "leakage", "listed in train and in val: validation would score an image "
                                                     "it trained on; keep one row", [where]))
        else:
            findings.append(Finding("warning", "listed-twice", "the same row twice: read once", [where]))
    listed = [r for r in rows if id(r) not in repeated]
    there = [r.path.exists() for r in listed]  # (one stat a row)
    missing = [f"{r.path} (row {r.line})" for r, found in zip(listed, there) if not found]
    if missing:
        findings.append(Finding("warning", "missing", "no such file: skipped in training (--bad-files fail stops "
                                                      "instead)", missing))
    files = [FileInfo(r.path, r.split or "all", r.label) for r, found in zip(listed, there) if found]
    per_split: dict[str, list[str]] = {}
    for split in ("train", "val") if has_split else ("all",):
        per_split[split] = sorted({r.label for r in rows if (r.split or "all") == split})
    return per_split, files, findings


def _classes(folder: Path) -> tuple[list[str], list[str]]:
    """(visible class folder names, hidden folder paths) of one split."""
    dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    return [p.name for p in dirs if not p.name.startswith(".")], [str(p) for p in dirs if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------
# The whole dataset.

def check_dataset(root: str | Path, *, val_split: float | None = None, image_size: int = 224, full: bool = True,
                  near_bits: int = 4, columns: Columns | None = None) -> CheckReport:
    """Check a class-per-folder dataset, or a table of labels (.csv, .tsv, read as `columns` says);
    see the module docstring for what is reported."""
    root = Path(root)
    others: list[str] = []
    if is_table(root):
        per_split, files, findings = _table_layout(root, val_split, columns or Columns())
        split_dirs: dict[str, Path] = {}
    else:
        split_dirs, findings = _layout(root, val_split)
        per_split, files = {}, []
    for split, folder in split_dirs.items():
        classes, hidden = _classes(folder)
        per_split[split] = classes
        if hidden and folder != root:
            findings.append(Finding("warning", "hidden", f"hidden folders in {folder} are ignored (not classes)", hidden))
        if not classes:
            findings.append(Finding("error", "no-classes", f"no class folders in {folder}", [str(folder)]))
        for cls in classes:
            images = list_images(folder / cls)
            if not images:
                findings.append(Finding("error", "empty-class", f"class folder {folder / cls} holds no images; "
                                                                 "training stops on it: add images or remove it",
                                        [str(folder / cls)]))
            files += [FileInfo(p, split, cls) for p in images]
            others += [str(p) for p in sorted((folder / cls).rglob("*"))
                       if p.is_file() and not is_image_file(p) and not p.name.startswith(".")]
    all_classes = sorted(set().union(*per_split.values())) if per_split else []
    if len(per_split) > 1:
        for cls in all_classes:
            missing = [s for s, c in per_split.items() if cls not in c]
            if missing:
                findings.append(Finding("error", "class-missing", f"class {cls!r} is missing from "
                                        f"{', '.join(missing)}: each class must be in every split",
                                        [str(split_dirs[s] / cls) if split_dirs else f"{root} ({s})"
                                         for s in per_split if cls in per_split[s]]))
    if others:
        findings.append(Finding("info", "not-image", "files that are not images by their extension are ignored", others))

    start = time.perf_counter()
    for f in files:
        inspect_file(f, full=full)
    seconds = {"files": time.perf_counter() - start}
    findings += file_findings(files, image_size)
    if full:
        start = time.perf_counter()
        findings += duplicate_findings(files, near_bits)
        seconds["duplicates"] = time.perf_counter() - start
    counts = {s: {c: sum(1 for f in files if f.split == s and f.cls == c) for c in per_split[s]} for s in per_split}
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.kind))
    return CheckReport(str(root), list(per_split), all_classes, counts, findings, len(files), seconds)


CHECK_JSON = Kind("a JSON written by headstart check", json_by("check"))


def write_check_json(path: str | Path, report: CheckReport, *, labels: list[dict[str, Any]] | None = None,
                     overwrite: bool = False) -> Path:
    """`check --json FILE`: the report, and with `labels` the label check's ranking (every image's row,
    most suspect first). Replaces only a JSON headstart check wrote (outputs.claim), unless `overwrite`."""
    doc = {"written_by": f"headstart check {__version__}", **report.to_dict()}
    if labels is not None:
        doc["labels"] = {"suspects": sum(bool(r["suspect"]) for r in labels), "images": labels}
    with write_output(path, CHECK_JSON, mode="w", overwrite=overwrite) as f:
        f.write(json.dumps(doc, indent=2) + "\n")
    return Path(path)
