"""`headstart predict` on a folder vs a plain fp32 eval loop, ResNet50 with a 2-class head.

    python bench/predict.py [--folder DIR]

Both start from the same checkpoint file and include loading it; both decode with 2 worker
processes. plain: fp32, NCHW, eager, no_grad, batch 32. headstart: `predict()` with its defaults
(bf16 autocast where the CPU has it, channels_last, conv-bn folding; no torch.compile, so no
compile cost to count). Last line: predict_speedup=<headstart img/s / plain img/s>.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from _common import HYMENOPTERA, RESNET50_GFLOP_FORWARD, machine, matmul_peak_gflops, table

from headstart.checkpoint import load_checkpoint, save_checkpoint
from headstart.data import ImageDataset, Sample, make_loader
from headstart.models import create_model, get_model_info
from headstart.prediction import collect_files, predict
from headstart.preprocessing import normalize


def plain(ckpt: str, folder: str) -> tuple[float, int]:
    t = time.perf_counter()
    c = load_checkpoint(ckpt)
    files = collect_files([folder])
    loader = make_loader(ImageDataset([Sample(p, 0) for p in files], c.preprocessing.eval_transform()),
                         batch_size=32, shuffle=False, workers=2)
    n = 0
    with torch.no_grad():
        for b in loader:
            c.model(normalize(b.images, c.preprocessing)).softmax(1)
            n += len(b)
    return time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=str(HYMENOPTERA))
    args = ap.parse_args()
    peak = matmul_peak_gflops(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = create_model("resnet50", num_classes=2, weights="imagenet")
        ckpt = save_checkpoint(f"{tmp}/ck", model, classes=["ants", "bees"],
                               preprocessing=get_model_info("resnet50").preprocessing)
        t = time.perf_counter()
        preds = predict(ckpt, [args.folder])
        t_fast, n_fast = time.perf_counter() - t, len(preds)
        t_plain, n_plain = plain(str(ckpt), args.folder)
    assert n_fast == n_plain, (n_fast, n_plain)
    fast, slow = n_fast / t_fast, n_plain / t_plain
    print(f"machine: {machine()}; bf16 matmul peak measured now: {peak:.0f} GFLOP/s")
    print(table([
        ["plain fp32 eval loop (NCHW, eager)", n_plain, f"{t_plain:.1f}", f"{slow:.1f}", "1.00x",
         f"{slow * RESNET50_GFLOP_FORWARD / peak:.1%}"],
        ["headstart predict (defaults)", n_fast, f"{t_fast:.1f}", f"{fast:.1f}", f"{fast / slow:.2f}x",
         f"{fast * RESNET50_GFLOP_FORWARD / peak:.1%}"],
    ], ["ResNet50 prediction, end to end", "images", "seconds", "img/s", "speedup", "of bf16 peak"]))
    print(f"predict_speedup={fast / slow:.2f}")


if __name__ == "__main__":
    main()
