"""Labelled image datasets: finding the classes and images, loading, batching.

Layouts accepted for a dataset root:
    root/train/<class>/*.jpg + root/val/<class>/*.jpg   (splits given)
    root/<class>/*.jpg                                  (a seeded, stratified split: `val_split`)
    table.csv (or .tsv)                                 a row per image: its path (relative to the
                                                        table's folder, or absolute) and its label;
                                                        a `split` (train/val) or `is_valid` column,
                                                        else `val_split` (see `scan_table`)

One class map per run: class names sorted, taken from `train/`. Names starting with "." are
ignored, as are files that are not images by extension and folders that hold headstart runs (a run
folder has a `.headstart-run` file: a `runs/` folder written inside a dataset is never read as a
class). This module knows no networks: it yields uint8 image batches (N, 3, S, S) with integer labels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import os
import random
import signal
import struct
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image, features

from .preprocessing import Transform, to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif",
    *((".avif",) if features.check("avif") else ()),  # where this Pillow reads AVIF
})
# What a broken image file raises somewhere inside Pillow, on open or on decode.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError, IndexError,
                struct.error, ZeroDivisionError, Image.DecompressionBombWarning)


RUN_MARKER = ".headstart-run"  # in every run folder (runfolder.claim_run_folder)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def holds_runs(folder: Path) -> bool:
    """Whether `folder` is a headstart run folder or holds some (a `runs/` folder): never a class."""
    if (folder / RUN_MARKER).exists():
        return True
    try:
        with os.scandir(folder) as entries:  # (file types from the directory itself: no stat per image)
            return any(e.is_dir() and os.path.exists(os.path.join(e.path, RUN_MARKER)) for e in entries)
    except OSError:
        return False


def _visible_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and not holds_runs(p))


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int


@dataclass
class DatasetSplits:
    """The scanned dataset: one class map and the samples of each split."""

    root: Path
    classes: list[str]
    train: list[Sample]
    val: list[Sample]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: number of images}}."""
        out: dict[str, dict[str, int]] = {}
        for split, samples in (("train", self.train), ("val", self.val)):
            c = {name: 0 for name in self.classes}
            for s in samples:
                c[self.classes[s.label]] += 1
            out[split] = c
        return out


def find_classes(folder: str | Path) -> list[str]:
    """Sorted names of the visible sub-folders of `folder`; ValueError if there are none."""
    folder = Path(folder)
    _check_folder(folder)
    classes = [p.name for p in _visible_dirs(folder)]
    if not classes:
        raise ValueError(
            f"no class folders in {folder}: expected one sub-folder per class, e.g. {folder}/cats/*.jpg"
        )
    return classes


def parse_classes(classes: str | list[str] | None) -> list[str] | None:
    """Class names from a list, a comma-separated string, or a text file with one name per line."""
    if classes is None or isinstance(classes, list):
        return classes
    path = Path(classes)
    if "," not in classes and path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [c.strip() for c in classes.split(",")]
    if not names or not all(names) or len(set(names)) != len(names):
        raise ValueError(f"classes {classes!r:.200} must be distinct non-empty names, comma-separated "
                         "(e.g. dogs,wolves) or one per line in a file")
    return names


def list_images(folder: str | Path) -> list[Path]:
    """Image files below `folder` (recursive; symlinked folders followed, each real folder once;
    hidden names and run folders skipped), sorted."""
    out, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or two links to one folder: read once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (Path(root) / d / RUN_MARKER).exists()]
        out += [Path(root) / f for f in files if is_image_file(Path(f))]
    return sorted(out)


def as_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """One path or several, as a list (a string is one path, never its characters)."""
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def collect_files(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, and the image files below each folder (recursive, symlinked folders followed,
    hidden names skipped). `paths` is one path or several."""
    files: list[Path] = []
    for p in as_paths(paths):
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise FileNotFoundError(f"no image files in {p} (or below it); extensions read: "
                                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


def spread(samples: Sequence[Sample], n: int) -> list[Sample]:
    """At most `n` of `samples`, every k-th: spread over the list, so a class-sorted list gives each
    class its share (int8's calibration images)."""
    return list(samples[::max(1, len(samples) // max(n, 1))][:n])


def _check_folder(folder: Path) -> None:
    if folder.is_file():
        raise NotADirectoryError(f"{folder} is a file, not a dataset folder: pass the folder that holds the class "
                                 "folders (or train/ and val/)")
    if not folder.is_dir():
        raise FileNotFoundError(
            f"dataset folder not found: {folder}. Pass a folder with train/ and val/ sub-folders, "
            "or with one sub-folder per class"
        )


def make_samples(folder: str | Path, classes: Sequence[str]) -> list[Sample]:
    """Samples of one split; every class folder must exist and hold at least one image."""
    folder = Path(folder)
    present = set(find_classes(folder))
    extra = present - set(classes)
    if extra:
        raise ValueError(
            f"class folder(s) {sorted(extra)} in {folder} are not in the training classes {list(classes)}: "
            "each class must be present in both splits; add them to train/ or remove them"
        )
    samples = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if name not in present:
            raise ValueError(
                f"class {name!r} has no folder {class_dir}: each class must be present in both splits"
            )
        images = list_images(class_dir)
        if not images:
            raise ValueError(
                f"class folder {class_dir} holds no images (extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder"
            )
        samples += [Sample(p, label) for p in images]
    return samples


def stratified_split(samples: Sequence[Sample], val_fraction: float, *, seed: int = 0
                     ) -> tuple[list[Sample], list[Sample]]:
    """Split per class, keeping at least one image of each class on each side when possible."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-split (val_split) must be between 0 and 1, e.g. 0.2; got {val_fraction}")
    rng = random.Random(seed)
    by_class: dict[int, list[Sample]] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: str(s.path))
        rng.shuffle(group)
        n_val = min(max(1, round(len(group) * val_fraction)), len(group) - 1)
        if n_val < 1:
            raise ValueError(
                f"class folder {group[0].path.parent} has {len(group)} image(s): at least 2 are needed to split"
            )
        val += group[:n_val]
        train += group[n_val:]
    return train, val


def refuse_val_split(root: Path, val_split: float | None, *, what: str = "train/ and val/ folders") -> None:
    """ValueError where `val_split` is given for a dataset that has its own split (it would be ignored)."""
    if val_split is not None:
        raise ValueError(f"{root} has {what}: --val-split {val_split} would be ignored (it splits a dataset that has "
                         "no split of its own); drop it")


def scan_dataset(root: str | Path, *, val_split: float | None = None, seed: int = 0,
                 columns: "Columns | None" = None) -> DatasetSplits:
    """Find the classes and images of a dataset root (see the module docstring for layouts): a
    table of labels (.csv, .tsv: `scan_table`, read as `columns` says) or a folder."""
    if is_table(root):
        return scan_table(root, val_split=val_split, seed=seed, columns=columns or Columns())
    if columns is not None and columns != Columns():
        raise ValueError(f"{root} is a folder: --path-column, --label-column and --allow-outside are for a table of "
                         "labels (a .csv or .tsv file); drop them")
    root = Path(root)
    _check_folder(root)
    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir():
        classes = find_classes(train_dir)
        train = make_samples(train_dir, classes)
        if val_dir.is_dir():
            refuse_val_split(root, val_split)
            val = make_samples(val_dir, classes)
        else:
            if val_split is None:
                raise ValueError(f"{root} has train/ but no val/ folder: add {val_dir}, or pass --val-split 0.2 "
                                 "(val_split) to hold out a fifth of train/")
            train, val = stratified_split(train, val_split, seed=seed)
    else:
        classes = find_classes(root)
        if val_split is None:
            raise ValueError(f"{root} has no train/ and val/ folders; to split its class folders, pass "
                             "--val-split 0.2 (val_split)")
        train, val = stratified_split(make_samples(root, classes), val_split, seed=seed)
    if len(classes) < 2:
        where = train_dir if train_dir.is_dir() else root
        raise ValueError(f"{where} has one class folder ({classes[0]!r}): a classifier needs at least two; add a "
                         "folder of images for each other class")
    return DatasetSplits(root, classes, train, val)


# ---------------------------------------------------------------------------------------------
# Tables of labels.

TABLE_SUFFIXES = {".csv": ",", ".tsv": "\t"}
PATH_COLUMNS = ("path", "file", "image", "filename")  # found by header, whatever the case
LABEL_COLUMNS = ("label", "class", "category")
SPLIT_VALUES = {"train": "train", "val": "val", "valid": "val", "validation": "val"}
IS_VALID_VALUES = {"true": "val", "1": "val", "yes": "val", "false": "train", "0": "train", "no": "train"}


@dataclass(frozen=True)
class Columns:
    """How a table of labels is read: its image and label columns (None: found by header), and
    whether a relative path may leave the table's folder (`..`)."""

    path: str | None = None
    label: str | None = None
    allow_outside: bool = False


@dataclass(frozen=True)
class TableRow:
    line: int  # in the file (the header is line 1)
    path: Path  # the table's folder joined with a relative path, or the absolute path as given
    label: str
    split: str | None  # train or val where the table has a split column


def is_table(root: str | os.PathLike[str]) -> bool:
    return Path(root).suffix.lower() in TABLE_SUFFIXES and not Path(root).is_dir()


def read_table(table: str | os.PathLike[str], columns: Columns = Columns()) -> tuple[list[TableRow], bool]:
    """(the rows of a table of labels, whether it has a split column). ValueError naming the row and
    the fix for: a column that is not there, a row without a path or a label, a relative path that
    leaves the table's folder (unless `columns.allow_outside`), a split value that is not one."""
    table = Path(table)
    if not table.is_file():
        raise FileNotFoundError(f"table not found: {table}. Pass a .csv or .tsv with a path and a label column, or a "
                                "folder of class folders")
    try:
        return _read_rows(table, columns)
    except UnicodeDecodeError as e:
        raise ValueError(f"{table} is not UTF-8 text ({e.reason} at byte {e.start}): save it as CSV UTF-8 (or TSV)") \
            from None


def _read_rows(table: Path, columns: Columns) -> tuple[list[TableRow], bool]:
    with open(table, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=TABLE_SUFFIXES[table.suffix.lower()])
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        path_col = _column(table, header, columns.path, PATH_COLUMNS, "--path-column")
        label_col = _column(table, header, columns.label, LABEL_COLUMNS, "--label-column")
        lower = {h.lower(): h for h in header}
        split_col = lower.get("split") or lower.get("is_valid")
        values = SPLIT_VALUES if split_col and split_col.lower() == "split" else IS_VALID_VALUES
        folder, rows = table.parent, []
        for record in reader:
            line = reader.line_num
            record.pop(None, None)  # (cells past the header's: not read)
            raw, label = (record.get(path_col) or "").strip(), (record.get(label_col) or "").strip()
            if not raw and not label and not any((v or "").strip() for v in record.values()):
                continue  # an empty line, or one of empty cells (",,")
            where = f"{table}, row {line}"
            if not raw:
                raise ValueError(f"{where}: no image path in column {path_col!r}; give one, or remove the row")
            if not label:
                raise ValueError(f"{where}: {raw} has an empty label (column {label_col!r}); give every row a "
                                 "label, or remove the row")
            if os.sep == "/" and "\\" in raw and "/" not in raw:  # a path written on Windows: img\a.png
                if PureWindowsPath(raw).anchor:
                    raise ValueError(f"{where}: {raw} is a Windows path; give it relative to the table's folder "
                                     "(img/a.png) or as this machine's absolute path")
                raw = PureWindowsPath(raw).as_posix()
            path = Path(os.path.normpath(raw))
            if not path.is_absolute():
                path = Path(os.path.normpath(folder / path))
                if not columns.allow_outside and not _within(path, folder):
                    raise ValueError(f"{where}: {raw} leaves the table's folder {folder}; move the table up, give "
                                     "an absolute path, or pass --allow-outside to read it")
            split = None
            if split_col:
                value = (record.get(split_col) or "").strip()
                split = values.get(value.lower())
                if split is None:
                    raise ValueError(f"{where}: {split_col} is {value!r}, not one of {', '.join(values)}; fix the "
                                     "row, or drop the column and pass --val-split 0.2")
            rows.append(TableRow(line, path, label, split))
    return rows, split_col is not None


def _column(table: Path, header: list[str], named: str | None, names: tuple[str, ...], flag: str) -> str:
    if named is not None:
        if named not in header:
            raise ValueError(f"{table} has no column {named!r} ({flag}); its columns: {', '.join(header) or 'none'}")
        return named
    lower = {h.lower(): h for h in header}
    found = next((lower[n] for n in names if n in lower), None)
    if found is None:
        raise ValueError(f"{table}: no column named {' or '.join(names)} in its header ({', '.join(header) or 'none'}"
                         f"); name the column with {flag}")
    return found


def _within(path: Path, folder: Path) -> bool:
    rel = os.path.relpath(path, folder)
    return rel != ".." and not rel.startswith(".." + os.sep)


def table_repeats(rows: Sequence[TableRow]) -> list[tuple[TableRow, TableRow]]:
    """(first row, later row) for each file listed again (compared as written, after joining)."""
    first: dict[str, TableRow] = {}
    out = []
    for r in rows:
        key = os.path.normcase(os.path.abspath(r.path))  # (relative to the working folder, or absolute: one file)
        if key in first:
            out.append((first[key], r))
        else:
            first[key] = r
    return out


def scan_table(table: str | os.PathLike[str], *, val_split: float | None = None, seed: int = 0,
               columns: Columns = Columns()) -> DatasetSplits:
    """The splits of a table of labels (`read_table`), ordered as a folder dataset orders its files
    (classes sorted, each class's paths sorted), so the same files give the same run. A file listed
    twice is an error naming both rows (an identical row is read once); so is a class in val that
    train never has, or a class without val rows."""
    table = Path(table)
    rows, has_split = read_table(table, columns)
    kept = _once(table, rows, splits=True)
    if not kept:
        raise ValueError(f"{table} lists no images: a header with a path and a label column, then a row per image")
    if has_split:
        refuse_val_split(table, val_split, what="a split column")
        train_rows, val_rows = [r for r in kept if r.split == "train"], [r for r in kept if r.split == "val"]
        classes = sorted({r.label for r in train_rows})
        stray = next((r for r in val_rows if r.label not in classes), None)
        if stray is not None:
            raise ValueError(f"{table}, row {stray.line}: class {stray.label!r} is in val but no train row has it: "
                             "each class must be in both splits; add train rows for it or remove its val rows")
        lacking = sorted(set(classes) - {r.label for r in val_rows})
        if lacking:
            raise ValueError(f"{table}: class(es) {lacking} have no val row: each class must be in both splits")
        train, val = _table_samples(train_rows, classes), _table_samples(val_rows, classes)
    else:
        classes = sorted({r.label for r in kept})
        if val_split is None:
            raise ValueError(f"{table} has no split column; to hold out a fifth of each class for validation, pass "
                             "--val-split 0.2 (val_split), or add a column split (train/val) or is_valid (True/False)")
        train, val = stratified_split(_table_samples(kept, classes), val_split, seed=seed)
    if len(classes) < 2:
        raise ValueError(f"{table} labels every image {classes[0]!r}: a classifier needs at least two classes")
    return DatasetSplits(table, classes, train, val)


def evaluation_samples(data: str | os.PathLike[str], *, columns: Columns | None = None
                       ) -> tuple[list[str], list[Sample]]:
    """What evaluate reads: a folder's val/ folder (else the folder itself), or a table's val rows
    (else all its rows): (the class names present, sorted; the samples, labelled by their index)."""
    if is_table(data):
        return table_split(data, "val", columns=columns)
    folder = Path(data)
    if (folder / "val").is_dir():
        folder = folder / "val"
    present = find_classes(folder)
    return present, make_samples(folder, present)


def table_split(table: str | os.PathLike[str], split: str, *, columns: Columns | None = None
                ) -> tuple[list[str], list[Sample]]:
    """A table's rows of `split` (train or val; every row where it has no split column), each file
    once: (the class names present, sorted; the samples, labelled by their index)."""
    rows, has_split = read_table(table, columns or Columns())
    chosen = [r for r in _once(table, rows, splits=False) if r.split == split or not has_split]
    if not chosen:
        raise ValueError(f"{table} has no {f'{split} ' if has_split else ''}rows to read")
    present = sorted({r.label for r in chosen})
    return present, _table_samples(chosen, present)


def _once(table: Path | str | os.PathLike[str], rows: Sequence[TableRow], *, splits: bool) -> list[TableRow]:
    """`rows`, each file once (the first row that lists it); ValueError naming both rows for a file
    listed again with another label (or, with `splits`, in another split)."""
    repeats = table_repeats(rows)
    for a, b in repeats:
        if a.label != b.label or (splits and a.split != b.split):
            what = f"label {a.label!r} and {b.label!r}" if a.label != b.label else f"split {a.split} and {b.split}"
            raise ValueError(f"{table}, rows {a.line} and {b.line}: {b.path} is listed twice, with {what}; keep one "
                             "row (`headstart check` lists every such file)")
        log.warning("%s, row %d: %s is listed again (row %d); read once", table, b.line, b.path, a.line)
    again = {id(b) for _, b in repeats}
    return [r for r in rows if id(r) not in again]


def _table_samples(rows: Sequence[TableRow], classes: list[str]) -> list[Sample]:
    return sorted((Sample(r.path, classes.index(r.label)) for r in rows), key=lambda s: (s.label, s.path))


# ---------------------------------------------------------------------------------------------
# Loading and batching.

def open_image(source: str | os.PathLike[str] | bytes | BinaryIO) -> Image.Image:
    """Open an image lazily (header only) from a path, its bytes or a binary file; raises one of
    IMAGE_ERRORS if it is not an image, DecompressionBombError over Pillow's pixel guard
    (`Image.MAX_IMAGE_PIXELS`, 89.5 M). That guard is checked here, the same for every command and
    thread: Pillow itself only warns between 1x and 2x of it, and a warnings filter set to turn that
    into an error is process-wide state that threads decoding side by side (serve) undo for each other."""
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        img.close()
        raise Image.DecompressionBombError(f"the image is {img.width}x{img.height} = {img.width * img.height} pixels, "
                                           f"over the limit of {limit} (Pillow's decompression-bomb guard)")
    return img


def load_image(path: str | Path) -> Image.Image:
    """Decode a whole image: EXIF orientation applied, any mode converted to 8-bit RGB."""
    with open_image(path) as img:
        return to_rgb(img)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-(seed, epoch, sample) seed, independent of worker processes and batch order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> (uint8 image (3, S, S) or None, label, index).

    Indexed by (index, epoch) pairs (see `EpochBatches`) so that augmentation depends only on the
    seed, the epoch and the sample. A file that cannot be decoded gives None, never an exception:
    the batch drops it and reports it (`Batch.failed`).
    """

    def __init__(self, samples: Sequence[Sample], transform: Transform, *, seed: int = 0,
                 size: Callable[[int], int] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.size = size  # the crop's side per epoch (preprocessing.CropSchedule); None: the transform's own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int, int, str]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        sample = self.samples[index]
        rng = random.Random(sample_seed(self.seed, epoch, index))
        try:
            with open_image(sample.path) as img:
                size = self.size(epoch) if self.size is not None else None
                return self.transform(img, rng, size=size), sample.label, index, ""
        except IMAGE_ERRORS as e:
            return None, sample.label, index, f"{type(e).__name__}: {e}"


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    indices: torch.Tensor  # int64 (N,): positions in the dataset's sample list
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of undecodable files

    def __len__(self) -> int:
        return len(self.labels)


def collate(items: list[tuple[torch.Tensor | None, int, int, str]]) -> Batch:
    ok = [it for it in items if it[0] is not None]
    failed = [(it[2], it[3]) for it in items if it[0] is None]
    if not ok:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                     torch.empty(0, dtype=torch.long), failed)
    return Batch(torch.stack([it[0] for it in ok]), torch.tensor([it[1] for it in ok]),
                 torch.tensor([it[2] for it in ok]), failed)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, epoch) pairs: epoch `epoch`'s order of the n samples (shuffled by a
    generator seeded by (seed, epoch) if `shuffle`) cut into batches of `batch_size`. A process of a
    data-parallel group (`rank` of `world`, distributed.py) takes every world-th sample of each
    batch, so the group's batches together are one process's, whatever the group's size; every
    rank has as many batches (the last may be empty on some). Call `set_epoch` before each epoch."""

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.epoch, self.start = rank, world, 0, 0

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        """Use epoch `epoch`'s order, from batch `start` on (to resume an interrupted epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1) % 2**63)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start * self.batch_size, self.n, self.batch_size):
            yield [(i, self.epoch) for i in order[b:b + self.batch_size][self.rank::self.world]]


def make_loader(dataset: ImageDataset, *, batch_size: int, shuffle: bool, workers: int = 0,
                seed: int = 0, rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader of `Batch`es over an ImageDataset; `loader.batch_sampler.set_epoch(e)` per
    epoch. `rank`, `world`: this process's share of each batch (see EpochBatches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    batches = EpochBatches(len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank, world=world)
    # Persistent workers: forked once. Forked again every epoch, they made each training step about 20%
    # slower (0.92 -> 1.16 s, hymenoptera, amx): the parent's pages written after each fork are copied.
    # Whoever keeps a loader drops it when done (Strategy.close): its workers then end at once, where a
    # later garbage collection would wait 5 s a worker (it closes their queues before the loader).
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_ignore_interrupts if workers > 0 else None,
    )


def _ignore_interrupts(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
