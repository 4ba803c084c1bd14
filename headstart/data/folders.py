"""Datasets as folders: root/train/<class>/*.jpg + root/val/<class>/*.jpg (splits given), or
root/<class>/*.jpg (a seeded, stratified split: `val_split`); `scan_dataset` reads either, or a
table of labels (tables.py). One class map per run: class names sorted, taken from `train/`. Names
starting with "." are ignored, as are files that are not images by extension and folders that hold
headstart runs (a run folder has a `.headstart-run` file: a `runs/` folder written inside a
dataset is never read as a class).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from headstart.data.images import IMAGE_EXTENSIONS, RUN_MARKER, list_images
from headstart.data.samples import DatasetSplits, Sample, refuse_val_split, stratified_split
from headstart.data.tables import Columns, is_table, scan_table, table_split


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
