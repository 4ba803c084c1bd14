"""`headstart predict` on a folder vs a plain fp32 eval loop, ResNet50 with a 2-class head.

    python bench/predict.py [--folder DIR] [--rounds 3]

Both start from the same checkpoint file and include loading it; both decode with 2 worker
processes. plain: fp32, NCHW, eager, no_grad, batch 32. headstart: `predict()` with its defaults
(on a CPU: OpenVINO, bf16 where the CPU has it). Each round times three calls: headstart's first
run on this checkpoint (its converted graph removed from the disk cache first, so the conversion,
0.75-1.1 s for ResNet50, is paid and counted), a second run (the graph read from the cache), and
the plain loop (this machine is shared: load comes in bursts, so they take turns). Medians over
--rounds are compared. Last line: predict_speedup=<headstart first run / plain, img/s>.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import torch

from _common import HYMENOPTERA, RESNET50_GFLOP_FORWARD, compute_peak, cpu_line, machine, table

from headstart.checkpoint import save_checkpoint
from headstart.data import ImageDataset, Sample, make_loader
from headstart.download import cache_dir
from headstart.engine import graph_key
from headstart.models import create_model, get_model_info, open_model
from headstart.prediction import collect_files, predict
from headstart.preprocessing import normalize
from headstart.runtime import resolve_runtime


def plain(ckpt: str, folder: str) -> int:
    c = open_model(ckpt)
    files = collect_files([folder])
    loader = make_loader(ImageDataset([Sample(p, 0) for p in files], c.preprocessing.eval_transform()),
                         batch_size=32, shuffle=False, workers=2)
    n = 0
    with torch.no_grad():
        for b in loader:
            c.model(normalize(b.images, c.preprocessing)).softmax(1)
            n += len(b)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(HYMENOPTERA))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    peak_kind, peak = compute_peak()
    times: dict[str, list[float]] = {"plain": [], "first": [], "again": []}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = create_model("resnet50", num_classes=2, weights="imagenet")
        ckpt = save_checkpoint(f"{tmp}/ck", model, classes=["ants", "bees"],
                               preprocessing=get_model_info("resnet50").preprocessing)
        size = get_model_info("resnet50").preprocessing.image_size
        graph = cache_dir() / "openvino" / graph_key(open_model(ckpt).model.eval(), (3, size, size))
        for _ in range(args.rounds):
            shutil.rmtree(graph, ignore_errors=True)  # a first run: the conversion is paid
            for name in ("first", "again"):
                t = time.perf_counter()
                n_fast = len(predict(ckpt, [args.folder]))
                times[name].append(time.perf_counter() - t)
            assert graph.is_dir(), f"predict did not keep its converted graph in {graph}"
            t = time.perf_counter()
            n_plain = plain(str(ckpt), args.folder)
            times["plain"].append(time.perf_counter() - t)
            assert n_fast == n_plain, (n_fast, n_plain)
    t_plain = statistics.median(times["plain"])
    slow = n_plain / t_plain
    t_fast, t_again = statistics.median(times["first"]), statistics.median(times["again"])
    fast, again = n_fast / t_fast, n_fast / t_again
    print(f"machine: {machine()}; {peak_kind} matmul peak measured now: {peak:.0f} GFLOP/s")
    print(cpu_line())
    print(f"headstart runtime: {resolve_runtime().describe()}")
    print(table([
        ["plain fp32 eval loop (NCHW, eager)", n_plain, f"{t_plain:.1f}", f"{slow:.1f}", "1.00x",
         f"{slow * RESNET50_GFLOP_FORWARD / peak:.1%}"],
        ["headstart predict, first run (converts)", n_fast, f"{t_fast:.1f}", f"{fast:.1f}",
         f"{fast / slow:.2f}x", f"{fast * RESNET50_GFLOP_FORWARD / peak:.1%}"],
        ["headstart predict, again (graph cached)", n_fast, f"{t_again:.1f}", f"{again:.1f}",
         f"{again / slow:.2f}x", f"{again * RESNET50_GFLOP_FORWARD / peak:.1%}"],
    ], ["ResNet50 prediction, end to end (median)", "images", "seconds", "img/s", "speedup", f"of {peak_kind} peak"]))
    ratios = [p / h for p, h in zip(times["plain"], times["first"])]
    print(f"seconds per round: headstart first {', '.join(f'{t:.1f}' for t in times['first'])}; "
          f"again {', '.join(f'{t:.1f}' for t in times['again'])}; "
          f"plain {', '.join(f'{t:.1f}' for t in times['plain'])}; "
          f"per-round speedups of first runs {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"cached: predict_speedup_cached={again / slow:.2f}")
    print(f"predict_speedup={fast / slow:.2f}")


if __name__ == "__main__":
    main()
