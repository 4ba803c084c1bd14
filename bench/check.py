"""`headstart check` on 2k to 100k images: the time per image of reading every file and of the
near-duplicate search, apart, and how each grows.

    python bench/check.py [--sizes 2000,8000,32000,100000]

The images: small JPEGs (64x64, quality 90) made here, each a random smooth pattern (a 16x16 grid of
random colours, resized bilinearly, plus a little noise), in train/ and val/ class folders; one in
fifty is a re-encoded copy of another (a near-duplicate the check must find). `check_dataset`
times its two parts (report.seconds): reading (read, hash, decode at a reduced JPEG scale, dHash)
and the duplicate search (check.near_pairs). Last lines: the growth exponent of each part's time,
fitted over the sizes from 8k on (log time against log images: 1 is linear, 2 quadratic).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import numpy as np
from _common import cpu_line, machine, table
from PIL import Image

from headstart.analysis.check import check_dataset


def make_images(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    made: list[Path] = []
    for i in range(n):
        split = "val" if i % 5 == 4 else "train"
        folder = root / split / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        if i % 50 == 49 and made:  # a near-duplicate of an earlier image of the same split
            with Image.open(made[int(rng.integers(0, len(made)))]) as src:
                src.save(path, quality=70)
        else:
            # (a 4x4 grid made dHashes too alike to stand for photos: the search took 0.56 s at 8k, 13.4 s at 32k)
            grid = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
            img = Image.fromarray(grid, "RGB").resize((64, 64), Image.Resampling.BILINEAR)
            arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, (64, 64, 3)), 0, 255)
            Image.fromarray(arr.astype(np.uint8), "RGB").save(path, quality=90)
        if split == "train":
            made.append(path)


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-9)) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000,8000,32000,100000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"machine: {machine()}")
    print(cpu_line())
    rows, files_s, dup_s = [], [], []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            make_images(Path(tmp), n)
            report = check_dataset(tmp)
        near = sum(len(f.paths) for f in report.findings if "near-identical" in f.message or "byte-identical" in f.message)
        files_s.append(report.seconds["files"])
        dup_s.append(report.seconds["duplicates"])
        rows.append([f"{n:,}", f"{report.seconds['files']:.2f}", f"{1e3 * report.seconds['files'] / n:.3f}",
                     f"{report.seconds['duplicates']:.3f}", f"{1e6 * report.seconds['duplicates'] / n:.2f}", near])
        print(f"  {n} images: reading {report.seconds['files']:.2f}s, duplicate search "
              f"{report.seconds['duplicates']:.3f}s", flush=True)
    print(table(rows, ["images", "reading s", "reading ms/image", "duplicate search s", "search us/image",
                       "images in duplicate findings"]))
    fit = [i for i, n in enumerate(sizes) if n >= 8000]
    if len(fit) >= 2:
        print(f"growth exponent over {sizes[fit[0]]:,}-{sizes[fit[-1]]:,} images: reading "
              f"{slope([sizes[i] for i in fit], [files_s[i] for i in fit]):.2f}, duplicate search "
              f"{slope([sizes[i] for i in fit], [dup_s[i] for i in fit]):.2f}")


if __name__ == "__main__":
    main()
