"""A table of labels (.csv, .tsv): a row per image, its path (relative to the table's folder, or
absolute) and its label; a `split` (train/val) or `is_valid` column, else `val_split`.
`read_table` reads the rows, `scan_table` the splits (ordered as a folder dataset orders its files).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Sequence

from headstart.data.samples import DatasetSplits, Sample, refuse_val_split, stratified_split

log = logging.getLogger(__name__)


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
