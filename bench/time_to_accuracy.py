"""Time to a good model on a panel of datasets: the tutorial's plain recipe against `headstart train DATA`.

    python bench/time_to_accuracy.py                                  # the whole panel, 2 headstart runs each
    python bench/time_to_accuracy.py --datasets solar --repeat 1
    python bench/time_to_accuracy.py --plain-from bench/plain_amx.json  # the plain figures of an earlier run
    python bench/time_to_accuracy.py --checkout before=/tmp/old-clone # also another checkout's default, side by side
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/time_to_accuracy.py   # the avx2 class

The panel: hymenoptera and flowers12 (../shared/datasets) and solar cells from PyPI `elpv-dataset`
1.0.0.post1, fetched as the demo fetches it (headstart.demo.fetch_elpv): functional (defect
probability 0) against defective (1), 300 training and 150 validation images per class, drawn by a
seeded shuffle.

plain: the tutorial's recipe as a user writes it, in this process: ResNet50 with the same ImageNet
weights, every layer trained, SGD lr 0.001 momentum 0.9, batch 18, 10 epochs, fp32, NCHW, eager;
random resized crop 224 + flip; validation (resize 256, centre crop 224) after every epoch, the best
checkpoint saved. Decoding is headstart's (bench/data.py: the same speed as plain Pillow). Its wall
time runs from building the model to the end of its last epoch.

headstart: the whole command, `python -m headstart train DATA --out RUN`, as a user runs it
(interpreter start, pictures, label check and report included), from a cold feature and graph cache
(the converted weights and the built kernels linked in), `--repeat` times; the median wall time.
Its final val accuracy is the best checkpoint's (summary.json), its estimate the likely one it printed
(and how far the wall time was off it; the issue's target: within 30%).

Last line: panel_speedup=<geometric mean over the datasets of plain wall / headstart's median wall>,
with the CPU class. `--checkout LABEL=DIR` (repeatable) runs the checkout at DIR the same way, beside
this one (PYTHONPATH=DIR), e.g. the previous default, and prints each one's median wall against it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
from _common import ROOT, SHARED, compute_peak, cpu_line, machine, plain_epoch, table

from headstart.data import ImageDataset, make_loader, scan_dataset
from headstart.demo import fetch_elpv
from headstart.io.download import cache_dir
from headstart.models import create_model, get_model_info

PANEL = ("hymenoptera", "flowers12", "solar")
SOLAR_PER_CLASS = (300, 150)  # train, val images of each class


def panel_dataset(name: str) -> Path:
    if name == "solar":
        return fetch_elpv(per_class=SOLAR_PER_CLASS, seed=0)
    path = SHARED / "datasets" / name
    if not path.is_dir():
        raise SystemExit(f"{path} not found: the panel reads ../shared/datasets")
    return path


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


def headstart_run(checkout: Path, data: Path, tmp: Path, flags: Sequence[str] = ()) -> dict:
    """`python -m headstart train DATA [flags]` from `checkout`, cold caches; its wall time and summary."""
    home = tmp / "home"
    home.mkdir()
    for kept in ("weights", "kernels"):  # a cold feature and graph cache, with the converted weights and kernels
        if (cache_dir() / kept).exists():
            (home / kept).symlink_to(cache_dir() / kept)
    env = {**os.environ, "HEADSTART_HOME": str(home), "PYTHONPATH": str(checkout)}
    out = tmp / "run"
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "headstart", "train", str(data), "--out", str(out), *flags], cwd=tmp,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t
    if done.returncode:
        print(done.stdout[-3000:])
        raise SystemExit(f"headstart train failed in {checkout} (exit {done.returncode})")
    s = json.loads((out / "summary.json").read_text())
    closing = [line for line in done.stdout.splitlines() if line.startswith(("best val acc", "stopping", "plan:"))]
    return {"wall": wall, "acc": s["best_val_acc"], "best_epoch": s["best_epoch"],
            "estimate": (s.get("estimate") or {}).get("likely_s") or (s.get("estimate") or {}).get("total_s"),
            "estimate_most": (s.get("estimate") or {}).get("total_s"), "run_wall": s.get("wall_time_s"),
            "history": [(r["epoch"], round(r["val_acc"], 4), round(r["val_loss"], 4), round(r["elapsed"], 1))
                        for r in s["history"]], "stopped": s.get("stopped"), "training_s": s.get("training_s"),
            "lines": closing}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default=",".join(PANEL), help=f"comma-separated, of {', '.join(PANEL)}")
    ap.add_argument("--plain-epochs", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=2, help="headstart runs per dataset and checkout (the median)")
    ap.add_argument("--checkout", action="append", default=[], metavar="LABEL=DIR",
                    help="also run the headstart at DIR (a clone of another commit), side by side")
    ap.add_argument("--json", default=None, metavar="FILE",
                    help="write every measurement as JSON (after each dataset)")
    ap.add_argument("--table-from", default=None, metavar="FILE", help="print the table of an earlier --json only")
    ap.add_argument("--plain-from", default=None, metavar="FILE",
                    help="take the plain recipe's figures from FILE instead of running it (7-20 min a dataset): "
                         "JSON {dataset: {best_acc, best_epoch, wall_s}}, e.g. bench/plain_amx.json, measured on "
                         "the same machine")
    args = ap.parse_args()
    if args.table_from:
        results = json.loads(Path(args.table_from).read_text())
        print(results["cpu"])
        return summarize(results)
    plain_figures = json.loads(Path(args.plain_from).read_text()) if args.plain_from else {}
    missing = [n for n in args.datasets.split(",") if args.plain_from and n not in plain_figures]
    if missing:
        raise SystemExit(f"{args.plain_from} has no plain figures for {', '.join(missing)}: run those without "
                         "--plain-from, or pass --datasets")
    checkouts = {"headstart": ROOT, **{c.split("=", 1)[0]: Path(c.split("=", 1)[1]).resolve() for c in args.checkout}}
    print(f"machine: {machine()}")
    print(cpu_line())
    kind, peak = compute_peak()
    print(f"{kind} matmul peak measured now: {peak:.0f} GFLOP/s")
    create_model("resnet50", weights="imagenet")  # fetch/convert the weights once, outside the timings
    results: dict = {"cpu": cpu_line(), "peak": [kind, peak], "datasets": {}}
    for name in args.datasets.split(","):
        data = panel_dataset(name)
        splits = scan_dataset(data)
        print(f"\n{name}: {data} ({len(splits.train)} train, {len(splits.val)} val, {len(splits.classes)} classes)",
              flush=True)
        runs: dict[str, list[dict]] = {label: [] for label in checkouts}
        if args.plain_from:
            plain = plain_figures[name]
            print(f"  plain (from {args.plain_from}): {plain}")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                plain = plain_recipe(data, args.plain_epochs, Path(tmp))
        for i in range(args.repeat):  # taking turns, so a slow spell of the machine falls on each
            for label, checkout in checkouts.items():
                with tempfile.TemporaryDirectory() as tmp:
                    r = headstart_run(checkout, data, Path(tmp))
                runs[label].append(r)
                print(f"  {label} run {i + 1}: {r['wall']:.1f}s, val acc {r['acc']:.4f} (epoch {r['best_epoch']}), "
                      f"estimate {r['estimate']}; history (epoch, val acc, val loss, s) {r['history']}", flush=True)
                for line in r["lines"]:
                    print(f"    {line}")
        results["datasets"][name] = {"n_val": len(splits.val), "plain": plain, "runs": runs}
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    summarize(results)


def summarize(results: dict) -> None:
    rows, ratios = [], []
    for name, d in results["datasets"].items():
        if isinstance(d["plain"], dict):  # (--plain-from: the figures of an earlier run)
            plain_best, best_epoch, plain_wall = d["plain"]["best_acc"], d["plain"]["best_epoch"], d["plain"]["wall_s"]
        else:  # [(epoch, val acc, seconds since the start)]
            _, plain_best, _ = max(d["plain"], key=lambda r: (r[1], -r[0]))
            best_epoch = min(e for e, a, _ in d["plain"] if a == plain_best)
            plain_wall = d["plain"][-1][2]
        allowed = 1 / d["n_val"] if d["n_val"] < 100 else 0.01  # one point; one image where val has < 100
        first = None
        for label, rs in d["runs"].items():
            wall = statistics.median(r["wall"] for r in rs)
            first = first or wall
            accs = [r["acc"] for r in rs]
            est = [f"{r['estimate']:.0f} ({r['wall'] / r['estimate'] - 1:+.0%})" for r in rs if r["estimate"]]
            ok = all(a >= plain_best - allowed - 1e-9 for a in accs)
            rows.append([name, f"{plain_best:.4f} (ep {best_epoch})", f"{plain_wall:.0f}", label,
                         " / ".join(f"{r['wall']:.0f}" for r in rs) + f" (median {wall:.0f})",
                         " / ".join(f"{a:.4f}" for a in accs) + ("" if ok else " (short)"),
                         " / ".join(est) or "-", f"{plain_wall / wall:.1f}x",
                         f"{wall / first:.2f}"])
            if label == "headstart":
                ratios.append(plain_wall / wall)
    print()
    print(table(rows, ["dataset", "plain best val acc", "plain s", "checkout", "headstart s", "final val acc",
                       "estimate s (wall off it)", "speedup", "wall / headstart's"]))
    print(results["cpu"])
    print(f"panel_speedup={math.exp(statistics.mean(map(math.log, ratios))):.2f}")


if __name__ == "__main__":
    main()
