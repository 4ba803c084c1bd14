"""`headstart predict` on a folder vs a plain fp32 eval loop, ResNet50 with a 2-class head.

    python bench/predict.py [--folder DIR] [--rounds 3]
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/predict.py   # the AVX2 class

The head is trained first (frozen strategy, 3 epochs on hymenoptera), so that every row has an
accuracy: on hymenoptera's validation images, from the same predictions that are timed. Every
row starts from that checkpoint file and includes loading it; all decode with 2 worker processes.
plain: fp32, NCHW, eager, no_grad, batch 32. headstart: `predict()` with its defaults (on a CPU:
OpenVINO, bf16 where the CPU has it), then with precision fp32 and int8 (NNCF's quantization,
made once before the rounds and counted apart: the int8 model is kept in the cache). Each round
times headstart's first run on this checkpoint (its converted graph removed from the disk cache
first, so the conversion, 0.75-1.1 s for ResNet50, is paid and counted), a second run (the graph
read from the cache), fp32, int8 and the plain loop (this machine is shared: load comes in bursts,
so they take turns). Medians over --rounds are compared. Last line: predict_speedup=<headstart
first run / plain, img/s>.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import HYMENOPTERA, RESNET50_GFLOP_FORWARD, compute_peak, cpu_line, machine, table

from headstart.data import ImageDataset, Sample, make_loader
from headstart.data.transforms import normalize
from headstart.export.int8 import int8_model
from headstart.infer.prediction import collect_files, predict
from headstart.io.download import cache_dir
from headstart.models import open_model
from headstart.runtime.device import resolve_runtime
from headstart.runtime.openvino import graph_key
from headstart.training import TrainConfig, train


def plain(ckpt: str, folder: str) -> dict[str, str]:
    """{path: predicted class} of every image under `folder`, the plain way."""
    c = open_model(ckpt)
    files = collect_files([folder])
    loader = make_loader(ImageDataset([Sample(p, 0) for p in files], c.preprocessing.eval_transform()),
                         batch_size=32, shuffle=False, workers=2)
    out: dict[str, str] = {}
    with torch.no_grad():
        for b in loader:
            best = c.model(normalize(b.images, c.preprocessing)).softmax(1).argmax(1)
            out.update({str(files[i]): c.classes[j] for i, j in zip(b.indices.tolist(), best.tolist())})
    return out


def val_accuracy(predicted: dict[str, str]) -> str:
    """Accuracy over the predicted files that lie in a val/<class>/ folder (their class: the folder's name)."""
    val = {p: c for p, c in predicted.items() if Path(p).parent.parent.name == "val"}
    if not val:
        return "-"
    return f"{sum(Path(p).parent.name == c for p, c in val.items()) / len(val):.4f} ({len(val)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(HYMENOPTERA))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    peak_kind, peak = compute_peak()
    runs = {"plain": "plain fp32 eval loop (NCHW, eager)", "first": "headstart predict, first run (converts)",
            "again": "headstart predict, again (graph cached)", "fp32": "headstart predict --precision fp32",
            "int8": "headstart predict --precision int8 --reject off (int8 has no unknown-image test)"}
    times: dict[str, list[float]] = {name: [] for name in runs}
    answers: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        run = train(HYMENOPTERA, out=f"{tmp}/run", config=TrainConfig(strategy="frozen", epochs=3))
        ckpt = run.best_checkpoint
        t = time.perf_counter()
        int8_model(ckpt)  # NNCF's calibration on 300 training images and the parity gate, once
        t_quantize = time.perf_counter() - t
        size = open_model(ckpt).preprocessing.image_size
        graph = cache_dir() / "openvino" / graph_key(open_model(ckpt).model.eval(), (3, size, size))
        for _ in range(args.rounds):
            shutil.rmtree(graph, ignore_errors=True)  # a first run: the conversion is paid
            for name, precision in (("first", "auto"), ("again", "auto"), ("fp32", "fp32"), ("int8", "int8")):
                t = time.perf_counter()
                answers[name] = {p.path: p.label for p in predict(ckpt, [args.folder], precision=precision,
                                                                  reject="off" if precision == "int8" else "auto")}
                times[name].append(time.perf_counter() - t)
            assert graph.is_dir(), f"predict did not keep its converted graph in {graph}"
            t = time.perf_counter()
            answers["plain"] = plain(str(ckpt), args.folder)
            times["plain"].append(time.perf_counter() - t)
            assert all(len(a) == len(answers["plain"]) for a in answers.values())
    n = len(answers["plain"])
    rate = {name: n / statistics.median(t) for name, t in times.items()}
    print(f"machine: {machine()}; {peak_kind} matmul peak measured now: {peak:.0f} GFLOP/s")
    print(cpu_line())
    print(f"headstart runtime: {resolve_runtime().describe()}")
    print(table([[label, n, f"{statistics.median(times[name]):.1f}", f"{rate[name]:.1f}",
                  f"{rate[name] / rate['plain']:.2f}x", f"{rate[name] * RESNET50_GFLOP_FORWARD / peak:.1%}",
                  val_accuracy(answers[name])] for name, label in runs.items()],
                ["ResNet50 prediction, end to end (median)", "images", "seconds", "img/s", "speedup",
                 f"of {peak_kind} peak", "val accuracy (images)"]))
    ratios = [p / h for p, h in zip(times["plain"], times["first"])]
    print(f"int8: quantized (NNCF, 300 calibration images) and checked once in {t_quantize:.1f}s; "
          f"int8 against fp32 (both OpenVINO): {rate['int8'] / rate['fp32']:.2f}x")
    print("seconds per round: " + "; ".join(f"{name} {', '.join(f'{t:.1f}' for t in times[name])}" for name in runs)
          + f"; per-round speedups of first runs {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"cached: predict_speedup_cached={rate['again'] / rate['plain']:.2f}")
    print(f"predict_speedup={rate['first'] / rate['plain']:.2f}")


if __name__ == "__main__":
    main()
