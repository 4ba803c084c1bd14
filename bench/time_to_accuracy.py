"""Time to accuracy: the tutorial's plain recipe against `headstart train DATA` with its defaults.

    python bench/time_to_accuracy.py [--datasets hymenoptera,flowers12] [--plain-epochs 10]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/time_to_accuracy.py   # the AVX2 class

plain: the tutorial's recipe as a user writes it: ResNet50 with the same ImageNet weights, every
layer trained, SGD lr 0.001 momentum 0.9, batch 18, 10 epochs, fp32, NCHW, eager; random resized
crop 224 + flip; validation (resize 256, centre crop 224) after every epoch, the best checkpoint
saved. Decoding is headstart's (bench/data.py: the same speed as plain Pillow).
headstart: `train(DATA, config=TrainConfig())`, what `headstart train DATA` runs, from a cold
feature cache.

For each dataset: the plain recipe's best validation accuracy and its wall time (all its epochs:
what a user of it waits for; its time to its best epoch is shown too), then headstart's time to
reach that accuracy within one validation image, its final accuracy, its estimate against its
wall time. Times count from the start of the recipe (model building included, interpreter start
excluded). Last line: time_to_accuracy_speedup=<the worst dataset's plain time / headstart's time
to reach its accuracy>.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from _common import SHARED, compute_peak, cpu_line, machine, plain_epoch, table

from headstart.data import ImageDataset, make_loader, scan_dataset
from headstart.download import cache_dir
from headstart.models import create_model, get_model_info
from headstart.runtime import resolve_runtime
from headstart.training import TrainConfig, train


def plain_recipe(data: Path, epochs: int, out: Path) -> list[tuple[int, float, float]]:
    """The tutorial's recipe; returns (epoch, val acc, seconds since the start) per epoch."""
    start = time.perf_counter()
    torch.manual_seed(0)
    splits = scan_dataset(data)
    pre = get_model_info("resnet50").preprocessing
    model = create_model("resnet50", num_classes=len(splits.classes), weights="imagenet")
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    train_loader = make_loader(ImageDataset(splits.train, pre.train_transform()), batch_size=18, shuffle=True,
                               workers=2)
    val_loader = make_loader(ImageDataset(splits.val, pre.eval_transform()), batch_size=18, shuffle=False,
                             workers=2)
    best, rows = -1.0, []
    for epoch in range(1, epochs + 1):
        train_loader.batch_sampler.set_epoch(epoch)
        acc = plain_epoch(model, opt, train_loader, val_loader, pre, model.train)
        if acc > best:
            best = acc
            torch.save(model.state_dict(), out / "plain-best.pth")
        rows.append((epoch, acc, time.perf_counter() - start))
        print(f"  plain epoch {epoch}: val acc {acc:.4f} at {rows[-1][2]:.0f}s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="hymenoptera",
                    help="comma-separated, under ../shared/datasets (flowers12's plain recipe takes over an hour on "
                         "the AVX2 class)")
    ap.add_argument("--plain-epochs", type=int, default=10)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    print(cpu_line())
    kind, peak = compute_peak()
    print(f"{kind} matmul peak measured now: {peak:.0f} GFLOP/s; headstart's runtime: {resolve_runtime().describe()}")
    create_model("resnet50", weights="imagenet")  # fetch/convert the weights once, outside the timings
    rows, speedups = [], []
    for name in args.datasets.split(","):
        data = SHARED / "datasets" / name
        n_val = len(scan_dataset(data).val)
        with tempfile.TemporaryDirectory() as tmp:
            home = cache_dir()
            os.environ["HEADSTART_HOME"] = str(Path(tmp) / "home")  # a cold feature and graph cache...
            for kept in ("weights", "kernels"):  # ...with the converted weights and built kernels linked in
                (cache_dir() / kept).symlink_to(home / kept)
            t = time.perf_counter()
            result = train(data, out=Path(tmp) / "run", config=TrainConfig())
            hs_wall = time.perf_counter() - t
            os.environ["HEADSTART_HOME"] = str(home)
            plain = plain_recipe(data, args.plain_epochs, Path(tmp))
        best_epoch, plain_best, plain_to_best = max(plain, key=lambda r: (r[1], -r[0]))
        plain_wall = plain[-1][2]
        target = plain_best - 1 / n_val - 1e-9  # within one validation image
        reached = [r for r in result.history if r.val_acc >= target]
        t_reach = reached[0].elapsed if reached else float("nan")
        est = result.estimate.total_s if result.estimate else float("nan")
        speedups.append(plain_wall / t_reach if reached else 0.0)
        rows.append([name, f"{plain_best:.4f} (epoch {best_epoch})", f"{plain_wall:.0f} ({plain_to_best:.0f} to best)",
                     f"{t_reach:.1f}" + (f" (epoch {reached[0].epoch})" if reached else " (never)"),
                     f"{result.best_val_acc:.4f}", f"{est:.0f} / {hs_wall:.0f} ({est / hs_wall - 1:+.0%})",
                     f"{speedups[-1]:.1f}x"])
        print(f"  headstart on {name}: {result.chosen or result.history[-1].epoch} epochs; "
              f"history {[(r.epoch, round(r.val_acc, 4), round(r.elapsed, 1)) for r in result.history]}", flush=True)
    print(table(rows, ["dataset", "plain best val acc", "plain s", "headstart s to it (-1 image)",
                       "headstart final acc", "headstart estimate / wall s", "speedup"]))
    print(f"time_to_accuracy_speedup={min(speedups):.2f}")


if __name__ == "__main__":
    main()
