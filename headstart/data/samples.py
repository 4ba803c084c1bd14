"""What a dataset is once read, whatever its layout: `Sample`s (a path and a class index) in a
train and a val split (`DatasetSplits`), and the seeded, stratified split of one list into two.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


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


def spread(samples: Sequence[Sample], n: int) -> list[Sample]:
    """At most `n` of `samples`, every k-th: spread over the list, so a class-sorted list gives each
    class its share (int8's calibration images)."""
    return list(samples[::max(1, len(samples) // max(n, 1))][:n])


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
