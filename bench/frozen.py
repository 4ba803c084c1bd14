"""The frozen strategy, 10 epochs on hymenoptera, end to end: a plain loop vs headstart's default.

    python bench/frozen.py [--epochs 10]

plain: fp32, NCHW, eager; the train transform every epoch and the backbone run on every step (under
no_grad, in eval mode), the head trained with SGD momentum 0.5; validation every epoch.
headstart: `train(..., TrainConfig(strategy="frozen"))` with the feature cache in memory (a first
run: nothing reused from disk), which computes the backbone features once. A second row shows a
rerun that finds the features in the disk cache. Both times include building the model and the
data loaders. Last line: frozen_speedup=<plain time / headstart time>.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from _common import HYMENOPTERA, RESNET50_GFLOP_FORWARD, compute_peak, cpu_line, machine, plain_epoch, table

from headstart.data import ImageDataset, make_loader, scan_dataset
from headstart.models import create_model, freeze_backbone, get_model_info
from headstart.training import TrainConfig, train


def plain_loop(epochs: int, workers: int) -> tuple[float, float]:
    """Returns (best val accuracy, seconds)."""
    start = time.perf_counter()
    torch.manual_seed(0)
    splits = scan_dataset(HYMENOPTERA)
    pre = get_model_info("resnet50").preprocessing
    model = create_model("resnet50", num_classes=2, weights="imagenet")
    freeze_backbone(model)
    opt = torch.optim.SGD(model.fc.parameters(), lr=0.001, momentum=0.5)
    train_loader = make_loader(ImageDataset(splits.train, pre.train_transform()), batch_size=18, shuffle=True,
                               workers=workers)
    val_loader = make_loader(ImageDataset(splits.val, pre.eval_transform()), batch_size=18, shuffle=False,
                             workers=workers)
    best = 0.0
    def head_only() -> None:  # the frozen backbone in eval mode, the head training
        model.eval()
        model.fc.train()

    for epoch in range(1, epochs + 1):
        train_loader.batch_sampler.set_epoch(epoch)
        acc = plain_epoch(model, opt, train_loader, val_loader, pre, head_only)
        best = max(best, acc)
        print(f"  plain epoch {epoch}: val acc {acc:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    return best, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    create_model("resnet50", weights="imagenet")  # fetch/convert the weights once, outside the timings
    peak_kind, peak = compute_peak()
    images = 0
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(strategy="frozen", epochs=args.epochs, feature_cache="memory", workers=args.workers)
        t = time.perf_counter()
        fast = train(HYMENOPTERA, out=f"{tmp}/a", config=config)
        t_fast = time.perf_counter() - t
        disk = TrainConfig(strategy="frozen", epochs=args.epochs, feature_cache="disk", workers=args.workers)
        train(HYMENOPTERA, out=f"{tmp}/b", config=disk)  # fills the disk cache
        t = time.perf_counter()
        rerun = train(HYMENOPTERA, out=f"{tmp}/c", config=disk)
        t_rerun = time.perf_counter() - t
    images = (245 + 153) * args.epochs
    plain_acc, t_plain = plain_loop(args.epochs, args.workers)
    rows = [
        ["plain loop: fp32, NCHW, augment + backbone every epoch", f"{t_plain:.1f}", f"{images / t_plain:.1f}",
         "1.00x", f"{images * RESNET50_GFLOP_FORWARD / t_plain / peak:.1%}", f"{plain_acc:.4f}"],
        ["headstart default (features once, in memory)", f"{t_fast:.1f}", f"{images / t_fast:.1f}",
         f"{t_plain / t_fast:.2f}x", "-", f"{fast.best_val_acc:.4f}"],
        ["headstart rerun (features from the disk cache)", f"{t_rerun:.1f}", f"{images / t_rerun:.1f}",
         f"{t_plain / t_rerun:.2f}x", "-", f"{rerun.best_val_acc:.4f}"],
    ]
    print(f"machine: {machine()}; {peak_kind} matmul peak measured now: {peak:.0f} GFLOP/s")
    print(cpu_line())
    print(table(rows, [f"frozen ResNet50, hymenoptera, {args.epochs} epochs", "seconds", "epoch-images/s",
                       "speedup", f"of {peak_kind} peak", "best val acc"]))
    print(f"frozen_speedup={t_plain / t_fast:.2f}")


if __name__ == "__main__":
    main()
