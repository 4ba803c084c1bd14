"""`headstart predict CKPT PATH...`: each image's class, as a table, CSV or JSON (`infer.predict`)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from dataclasses import asdict
from typing import Any

from headstart.cli.console import say
from headstart.cli.options import add_inference_options, add_reject, add_weights_file, model_file


def cmd_predict(a: argparse.Namespace) -> int:
    from headstart.infer.prediction import predict

    named = a.weights or a.model  # then the first positional is an image too
    paths = ([a.checkpoint] if named else []) + a.paths
    if not paths:
        raise ValueError("no images given: pass image files or folders after the checkpoint")
    checkpoint = model_file(a, None if named else a.checkpoint)
    preds = predict(checkpoint, paths, top_k=a.top_k, batch_size=a.batch_size, workers=a.workers,
                    precision=a.precision, device=a.device, threads=a.threads, compile=a.compile,
                    engine=a.engine, arch=a.arch, classes=a.classes, reject=a.reject)
    if a.format == "json":
        # (no unknown-image test ran, as for an exported file: `unknown` is null, not false, as CSV leaves it blank)
        say(json.dumps([{**asdict(p), "unknown": None if p.familiarity is None else p.unknown} for p in preds],
                       indent=2))
    elif a.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "class", "probability", "top_k", "error", "familiarity", "unknown"])
        for p in preds:
            w.writerow([p.path, p.label or "", f"{p.probability:.6f}",
                        ";".join(f"{c}:{q:.6f}" for c, q in p.top_k), p.error or "",
                        *(["", ""] if p.familiarity is None else [f"{p.familiarity:.4f}", int(p.unknown)])])
        say(buf.getvalue(), end="")
    else:
        width = max([len(p.path) for p in preds] + [4])
        for p in preds:
            if p.error:
                say(f"{p.path:<{width}}  ERROR {p.error}")
            else:
                top = ", ".join(f"{c} {q:.3f}" for c, q in p.top_k)
                known = "" if p.familiarity is None else f"   familiarity {p.familiarity:.3f}"
                if p.unknown:
                    say(f"{p.path:<{width}}  {'unknown':<12} {'':5}   nearest: {top}{known}")
                else:
                    say(f"{p.path:<{width}}  {p.label:<12} {p.probability:.3f}   top-{len(p.top_k)}: {top}{known}")
    bad = sum(1 for p in preds if p.error)
    if bad:
        say(f"{bad} of {len(preds)} file(s) could not be read as images", file=sys.stderr)
    return 1 if preds and bad == len(preds) else 0  # (scripts see that nothing was predicted)


def add_predict(sub: Any, full: bool) -> None:
    """`headstart predict`'s parser (`full`: see build_parser)."""
    p = sub.add_parser("predict", help="classify image files or folders with a checkpoint",
                       description="Predict the class of each image (folders are searched recursively).")
    p.add_argument("checkpoint", help="a run's best.safetensors or last.safetensors (omit it with --weights)")
    p.add_argument("paths", nargs="*", help="image files and/or folders")
    add_weights_file(p)
    p.add_argument("--top-k", type=int, default=5, help="default: 5")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"], help="default: table")
    add_reject(p)
    p.add_argument("--model", default=None, metavar="FILE",
                   help="instead of a checkpoint: a model written by `headstart export` (.onnx, OpenVINO .xml)")
    if full:
        add_inference_options(p)
    p.set_defaults(func=cmd_predict)
