"""`headstart evaluate CKPT DATA`: accuracy, per-class metrics, the confusion matrix (`infer.evaluate`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say
from headstart.cli.options import (TABLE_OPTIONS, add_config_options, add_inference_options, add_weights_file,
                                   model_file, table_columns)


def _format_metrics(m: Any) -> str:
    lines = [f"images: {m.n}   accuracy: {m.accuracy:.4f}   balanced accuracy: {m.balanced_accuracy:.4f}   "
             f"loss: {m.loss:.4f}" + (f"   ECE: {m.ece:.4f}" if m.ece is not None else ""), ""]
    width = max(8, *(len(c.name) for c in m.per_class))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for c in m.per_class:
        lines.append(f"{c.name:<{width}}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:5.4f}  {c.support:7d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    names = [c.name for c in m.per_class]
    lines.append(" " * width + "  " + "  ".join(f"{n:>{max(5, len(n))}}" for n in names))
    for name, row in zip(names, m.confusion):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{max(5, len(n))}}" for v, n in zip(row, names)))
    if m.skipped:
        lines.append(f"\nskipped {len(m.skipped)} undecodable file(s): {', '.join(m.skipped)}")
    return "\n".join(lines)


def cmd_evaluate(a: argparse.Namespace) -> int:
    from headstart.infer.evaluation import METRICS_JSON, evaluate, write_metrics_json
    from headstart.io.outputs import claim

    checkpoint = model_file(a, a.checkpoint)
    if a.json:
        claim(a.json, METRICS_JSON, overwrite=a.overwrite)  # refused before the work, not after
    m = evaluate(checkpoint, a.data, columns=table_columns(a), batch_size=a.batch_size, workers=a.workers,
                 precision=a.precision, device=a.device, threads=a.threads, compile=a.compile, engine=a.engine,
                 arch=a.arch, classes=a.classes)
    say(_format_metrics(m))
    if a.json:
        say(f"\nmetrics written to {write_metrics_json(a.json, m, overwrite=a.overwrite)}")
    return 0


def add_evaluate(sub: Any, full: bool) -> None:
    """`headstart evaluate`'s parser (`full`: see build_parser)."""
    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix of a checkpoint",
                       description="Evaluate a checkpoint on DATA (its val/ folder if it has one).")
    p.add_argument("checkpoint", nargs="?", help="a run's best.safetensors or last.safetensors (or a file written by "
                                                 "`headstart export`)")
    p.add_argument("data", help="class-per-folder images (or a dataset root with val/), or a table of labels (.csv, "
                                ".tsv: its val rows where it has a split column)")
    add_weights_file(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--overwrite", action="store_true", help="--json may replace whatever file it names")
    if full:
        add_inference_options(p)
        add_config_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_evaluate)
