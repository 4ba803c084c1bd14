"""Know your data before training: a dataset check that reads every file once.

Findings, worst first:
- error: training would be wrong (a class missing from a split, an empty class folder, the same
  image in train and val: leakage; in a table of labels, a file listed with two labels, or in
  train and in val). `headstart check` exits non-zero unless `--allow` names them.
- warning: likely a problem (undecodable files, duplicates within a split, likely placeholders,
  tiny images, images over Pillow's decompression-bomb guard, hidden folders; a table's rows whose
  file is missing, or a row listed twice).
- info: handled automatically (modes converted to RGB, EXIF rotation applied, non-image files).

Near-identical images are found with a 64-bit difference hash (dHash: 9x8 greyscale, one bit per
horizontal gradient); two images whose hashes differ in at most `near_bits` bits are near-identical.
Cost: one decode per image, at a reduced JPEG scale (398 hymenoptera files: 1.6 s, about 4 ms a file, here).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

from . import __version__
from .data import IMAGE_ERRORS, Columns, is_image_file, is_table, list_images, open_image, read_table, \
    refuse_val_split, table_repeats
from .outputs import Kind, json_by, write_output
from .preprocessing import oriented_size, to_rgb

SEVERITY_ORDER = {"error": 0, "warning": 1, "info": 2}
BLOCKING = ("class-missing", "empty-class", "no-classes", "leakage", "no-split", "conflicting-labels")  # kinds that make training wrong
PLACEHOLDER_NAME = re.compile(r"(not.?found|placeholder|missing|no.?image|unavailable|default)", re.I)


@dataclass
class Finding:
    severity: str  # error | warning | info
    kind: str
    message: str
    paths: list[str] = field(default_factory=list)


@dataclass
class FileInfo:
    path: Path
    split: str
    cls: str
    size_bytes: int = 0
    sha256: str = ""
    error: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    exif_rotated: bool = False
    dhash: int | None = None
    colours: int | None = None  # distinct colours in a 64x64 thumbnail (photos have thousands)


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
# One file.

def dhash(img: Image.Image) -> int:
    """64-bit difference hash of an image (any mode)."""
    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def inspect_file(info: FileInfo, *, full: bool = True) -> FileInfo:
    """Fill in what one file is: size, hash, decodability, mode, orientation, dHash, colours.
    With `full=False` only the header is read (fast: catches empty files and non-images)."""
    try:
        data = info.path.read_bytes() if full else b""
        info.size_bytes = len(data) if full else info.path.stat().st_size
    except OSError as e:
        info.error = f"cannot read: {e.strerror or e}"
        return info
    if info.size_bytes == 0:
        info.error = "empty file (0 bytes)"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest() if full else ""
    try:
        with open_image(data if full else info.path) as img:  # the bytes already read
            info.mode = img.mode
            info.width, info.height = oriented_size(img)
            try:
                info.exif_rotated = img.getexif().get(0x0112, 1) not in (1, None)
            except Exception:
                info.exif_rotated = False
            if not full:
                return info
            if img.format == "JPEG":
                img.draft(img.mode, (64, 64))
            img.load()
            rgb = to_rgb(img)  # as training sees it: 16-bit and float images scaled, not clipped to white
            info.dhash = dhash(rgb)
            thumb = rgb.resize((64, 64), Image.Resampling.NEAREST)
            info.colours = len(thumb.getcolors(64 * 64) or [])
    except Image.DecompressionBombError as e:
        info.error = f"too large: {e}"
    except IMAGE_ERRORS as e:
        reason = str(e)
        if "truncated" in reason.lower():
            reason = f"truncated ({reason})"
        info.error = f"cannot decode: {type(e).__name__}: {reason}"
    return info


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
    findings += _file_findings(files, image_size)
    if full:
        start = time.perf_counter()
        findings += _duplicate_findings(files, near_bits)
        seconds["duplicates"] = time.perf_counter() - start
    counts = {s: {c: sum(1 for f in files if f.split == s and f.cls == c) for c in per_split[s]} for s in per_split}
    findings.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.kind))
    return CheckReport(str(root), list(per_split), all_classes, counts, findings, len(files), seconds)


def _file_findings(files: list[FileInfo], image_size: int) -> list[Finding]:
    out = []
    bad = [f for f in files if f.error]
    for f in bad:
        kind = "too-large" if f.error.startswith("too large") else "unreadable"
        out.append(Finding("warning", kind, f"{f.error}; skipped in training", [str(f.path)]))
    ok = [f for f in files if not f.error]
    by_mode: dict[str, list[str]] = defaultdict(list)
    for f in ok:
        if f.mode != "RGB":
            by_mode[f.mode or "?"].append(str(f.path))
    for mode, paths in sorted(by_mode.items()):
        out.append(Finding("info", "mode", f"mode {mode} is converted to RGB", paths))
    rotated = [str(f.path) for f in ok if f.exif_rotated]
    if rotated:
        out.append(Finding("info", "exif-rotated", "EXIF orientation is applied", rotated))
    tiny = [str(f.path) for f in ok if min(f.width, f.height) < image_size]
    if tiny:
        out.append(Finding("warning", "tiny", f"smaller than the {image_size}px crop: upscaled, so blurry", tiny))
    placeholders = [str(f.path) for f in ok if PLACEHOLDER_NAME.search(f.path.stem)
                    or (f.colours is not None and f.colours < 64)]
    if placeholders:
        out.append(Finding("warning", "placeholder", "likely placeholders, not photos of their class (a 'not "
                           "found' name or a flat graphic with few colours)", placeholders))
    return out


def _duplicate_findings(files: list[FileInfo], near_bits: int) -> list[Finding]:
    """Byte-identical and near-identical groups. Linear in the files: Python objects are made for
    the files in a group only (one per file for 100,000 files made the garbage collector's passes,
    and so the search, grow faster than the files)."""
    out = []
    ok = [f for f in files if not f.error]
    copies = Counter(f.sha256 for f in ok)
    exact: dict[str, list[FileInfo]] = defaultdict(list)
    for f in ok:
        if copies[f.sha256] > 1:
            exact[f.sha256].append(f)
    exact_pairs = set()
    for group in exact.values():
        out.append(_dup_finding(group, "byte-identical"))
        exact_pairs |= {(a.path, b.path) for a in group for b in group}
    hashed = [f for f in ok if f.dhash is not None]
    if len(hashed) > 1:
        pairs, _ = near_pairs(np.fromiter((f.dhash for f in hashed), dtype=np.uint64, count=len(hashed)), near_bits)
        parent: dict[int, int] = {}  # union-find over the files in a near pair only

        def find(i: int) -> int:
            parent.setdefault(i, i)
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in pairs:
            parent[find(i)] = find(j)
        groups: dict[int, list[FileInfo]] = defaultdict(list)
        for i in sorted(parent):
            groups[find(i)].append(hashed[i])
        for group in groups.values():
            if len(group) > 1 and not all((a.path, b.path) in exact_pairs for a in group for b in group):
                out.append(_dup_finding(group, "near-identical"))
                if len(group) >= 4:
                    out.append(Finding("warning", "placeholder", f"{len(group)} near-identical images: likely a "
                                       "placeholder or a stock image", [str(f.path) for f in group]))
    return out


def near_pairs(hashes: np.ndarray, near_bits: int) -> tuple[list[tuple[int, int]], int]:
    """The pairs (i, j) of `hashes` (uint64, 64-bit dHashes) that differ in at most `near_bits` bits,
    and how many pairs were compared to find them. Near-linear in the number of hashes, not quadratic:

    - equal hashes are one: their images pair up without a comparison, and they are searched once;
    - the 64 bits are cut into 2r blocks (r = near_bits); two hashes at most r bits apart agree
      exactly on at least r of the blocks, so every such pair shares one of the C(2r, r) keys made of
      r blocks (32 bits each). Hashes are grouped by each key (one sort of key and index in one integer), and
      only hashes sharing a key are compared. Two unrelated hashes share a 32-bit key by chance with
      probability about C(2r, r) / 2^32 (1.6e-8 for r = 4: a few pairs among 100,000 hashes), so the
      comparisons are about the near pairs themselves. Cost: C(2r, r) sorts of the distinct hashes
      (70 for r = 4), each O(n log n) in numpy; no Python loop over hashes or keys."""
    if not 0 <= near_bits <= 5:
        raise ValueError(f"near_bits must be from 0 to 5 (the keys number C(2r, r)), got {near_bits}")
    unique, first, inverse = np.unique(np.asarray(hashes, dtype=np.uint64), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    copies = np.flatnonzero(first[inverse] != np.arange(len(inverse)))  # the same hash: the same image to the hash
    pairs = list(zip(first[inverse[copies]].tolist(), copies.tolist()))
    if near_bits == 0 or len(unique) < 2:
        return pairs, 0
    blocks = 2 * near_bits
    edges = [round(64 * k / blocks) for k in range(blocks + 1)]
    index = np.arange(len(unique), dtype=np.uint64)
    shift = np.uint64(max(1, (len(unique) - 1).bit_length()))  # the index's bits, below the key's (<= 34 bits)
    found = []  # arrays of u * len(unique) + v, u < v: the indices into `unique` of hashes sharing a key
    for combo in itertools.combinations(range(blocks), near_bits):
        key = np.zeros(len(unique), dtype=np.uint64)  # the combo's blocks side by side: 32-34 bits (r = 4: 32)
        width = 0
        for b in combo:
            lo, hi = edges[b], edges[b + 1]
            key |= ((unique >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)) << np.uint64(width)
            width += hi - lo
        ordered = np.sort((key << shift) | index)  # by key, then by index
        keys, members = ordered >> shift, (ordered & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)
        for gap in range(1, len(ordered)):  # hashes `gap` apart in the order with the same key: a run's pairs
            same = np.flatnonzero(keys[gap:] == keys[:-gap])
            if not len(same):
                break
            found.append(members[same] * len(unique) + members[same + gap])
    if not found:
        return pairs, 0
    cand = np.unique(np.concatenate(found))
    u, v = cand // len(unique), cand % len(unique)
    x = np.bitwise_xor(unique[u], unique[v])
    bits = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
    near = bits <= near_bits
    pairs += zip(first[u[near]].tolist(), first[v[near]].tolist())
    return pairs, len(cand)


def _dup_finding(group: list[FileInfo], what: str) -> Finding:
    paths = [str(f.path) for f in group]
    splits = {f.split for f in group}
    if len(splits) > 1:
        return Finding("error", "leakage", f"{what} images in {' and '.join(sorted(splits))}: the validation "
                       "score is inflated; remove the copies from one split", paths)
    classes = {f.cls for f in group}
    extra = f" with different labels ({', '.join(sorted(classes))})" if len(classes) > 1 else ""
    return Finding("warning", "duplicate", f"{what} images within {group[0].split}{extra}", paths)


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


def unreadable_files(paths: Iterable[str | Path], *, full: bool = False) -> dict[str, str]:
    """{path: reason} for the files that cannot be read: run by `train`. By default only the header
    is read (the check's fast part: empty files, not an image whatever the extension, over the
    decompression-bomb guard); `full` decodes every file (a truncated JPEG too)."""
    out = {}
    for p in paths:
        info = inspect_file(FileInfo(Path(p), "", ""), full=full)
        if info.error:
            out[str(p)] = info.error
    return out
