"""Data-parallel scaling: ResNet50 fine-tuning in 1 process of 1 thread, then 2 processes of 1
thread each (`headstart train --nproc 2`: torchrun, gloo, DistributedDataParallel), on the same
images with the same global batch, side by side in one run. Prints each run's training img/s
(the second epoch's: the first warms up) and the scaling efficiency, img/s(2) / (2 x img/s(1)),
with each rank's own BatchNorm statistics (the default, as DDP's) and with --sync-batchnorm (the
global batch's: one process's results).

    .venv/bin/python bench/distributed.py [--images 96] [--batch-size 16] [--precision auto]

Needs ../shared (hymenoptera: the first --images training images, half of each class, and 16
validation images, linked into a temporary folder) and the ImageNet ResNet50 weights.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HYMENOPTERA, ROOT, cpu_line


def subset(root: Path, *, train: int, val: int) -> Path:
    """A dataset of symlinks to the first images of each class (nothing copied)."""
    for split, n in (("train", train), ("val", val)):
        classes = sorted(p for p in (HYMENOPTERA / split).iterdir() if p.is_dir())
        for c in classes:
            (root / split / c.name).mkdir(parents=True)
            for f in sorted(c.iterdir())[: n // len(classes)]:
                (root / split / c.name / f.name).symlink_to(f)
    return root


def run(data: Path, out: Path, nproc: int, a: argparse.Namespace, *extra: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "headstart", "train", str(data), "--out", str(out), "--strategy", "finetune",
           "--epochs", "2", "--batch-size", str(a.batch_size), "--threads", "1", "--workers", "1",
           "--precision", a.precision, "--engine", "torch", "--nproc", str(nproc), *extra]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    runtime = next((line for line in done.stdout.splitlines() if " on " in line and "strategy=" in line), "")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    return {"img_s": float(rows[-1]["images_per_s"]), "step_s": float(rows[-1]["step_time"]), "wall_s": wall,
            "runtime": runtime.split(" on ", 1)[-1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=96, help="training images (half of each class)")
    p.add_argument("--batch-size", type=int, default=16, help="the global batch")
    p.add_argument("--precision", default="auto")
    a = p.parse_args()
    print(cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        data = subset(Path(tmp) / "data", train=a.images, val=16)
        one = run(data, Path(tmp) / "one", 1, a)
        local = run(data, Path(tmp) / "local", 2, a)
        two = run(data, Path(tmp) / "two", 2, a, "--sync-batchnorm")
    print(f"ResNet50 fine-tune, {a.images} images, global batch {a.batch_size}, 1 thread per process, epoch 2:")
    for name, r in (("1 process               ", one), ("2 processes             ", local),
                    ("2, --sync-batchnorm      ", two)):
        print(f"  {name}  {r['img_s']:6.2f} img/s  {r['step_s']:6.2f} s/step  (run {r['wall_s']:.0f} s; {r['runtime']})")
    print(f"scaling_efficiency={local['img_s'] / (2 * one['img_s']):.3f}  speedup={local['img_s'] / one['img_s']:.2f}  "
          f"(each rank's BatchNorm statistics, the default)")
    print(f"scaling_efficiency_sync_batchnorm={two['img_s'] / (2 * one['img_s']):.3f}  "
          f"speedup={two['img_s'] / one['img_s']:.2f}  (BatchNorm over the global batch: one process's results)")


if __name__ == "__main__":
    main()
