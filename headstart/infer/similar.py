"""Similar images: the training images nearest a photo by the cosine similarity of the trained
model's backbone features (`Classifier.features`); `find_similar` is `headstart similar CKPT
IMAGE... --in DATA`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from headstart.analysis.labels import nearest
from headstart.data import Columns, Sample, collect_files, is_table, scan_dataset, table_split


@dataclass
class SimilarImage:
    path: str
    label: str
    similarity: float  # cosine similarity of the backbone features, 1 = the same


@dataclass
class SimilarImages:
    path: str  # the query image
    nearest: list[SimilarImage]  # most similar first; empty when the image could not be read
    error: str | None = None


def find_similar(checkpoint: str | os.PathLike[str], images: Sequence[str | os.PathLike[str]], *,
                 data: str | os.PathLike[str], k: int = 5, device: str = "auto", precision: str = "auto",
                 threads: int | None = None, workers: int = 2, arch: str | None = None,
                 columns: Columns | None = None) -> list[SimilarImages]:
    """For each image under `images`, the `k` training images of `data` (its train/ folder, or the
    folder itself, or a table's train rows: `columns`) nearest by the checkpoint's backbone features (cosine), from the disk feature
    cache when they are there. The model runs as `classifier.load` opens it."""
    from headstart.infer.opening import load

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    model = load(checkpoint, device=device, precision=precision, threads=threads, reject="off", arch=arch,
                 features=True)
    root = Path(data)
    if is_table(root):  # its train rows (every row where it has no split column)
        names, train = table_split(root, "train", columns=columns)
    elif (root / "train").is_dir():
        splits = scan_dataset(root, val_split=None)
        names, train = splits.classes, splits.train
    else:
        names, train = None, [Sample(p, 0) for p in collect_files([root])]
    files = collect_files(images)
    ref = model.features([s.path for s in train], cache=True, workers=workers)
    query = model.features(files, cache=True, workers=workers)
    if not len(ref.indices):
        raise ValueError(f"no readable training images under {root}")
    sims, idx = nearest(query.features, ref.features, k=k)

    def label(s: Sample) -> str:
        return names[s.label] if names else Path(s.path).parent.name

    out = {int(q): SimilarImages(str(files[int(q)]), [
        SimilarImage(str(train[int(ref.indices[j])].path), label(train[int(ref.indices[j])]), float(v))
        for v, j in zip(srow, irow)]) for q, srow, irow in zip(query.indices, sims, idx)}
    for q, reason in query.failed:
        out[q] = SimilarImages(str(files[q]), [], f"not a readable image ({reason})")
    return [out[i] for i in sorted(out)]
