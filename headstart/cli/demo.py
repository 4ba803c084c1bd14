"""`headstart demo`: the tutorial end to end (`demo.run_demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import ConsoleProgress, download_bar, print_run, say
from headstart.cli.options import add_config_options, train_config


def cmd_demo(a: argparse.Namespace) -> int:
    from headstart.demo import run_demo

    res = run_demo(data=a.data, out=a.out, config=train_config(a), callback=ConsoleProgress(),
                   progress=download_bar(), overwrite=a.overwrite)
    say(f"\ndataset: {res.data}\n  {res.about}")
    say(f"training batch picture: {res.batch_picture}")
    for strategy, run in res.runs.items():
        say(f"\n[{strategy}] ", end="")
        print_run(run)
    say(f"\ndemo: {res.wall_time:.1f}s (estimated {res.estimate_s:.1f}s); everything is in {res.out}")
    return 0


def add_demo(sub: Any, full: bool) -> None:
    """`headstart demo`'s parser (`full`: see build_parser)."""
    p = sub.add_parser("demo", help="the tutorial end to end: both strategies, pictures, checkpoints",
                       description="Run the ResNet50 transfer-learning tutorial end to end: show a batch, "
                                   "fine-tune all layers, then train only the head on a frozen backbone.")
    p.add_argument("--data", default=None,
                   help="dataset folder (default: the tutorial's Canidae_data.zip, downloaded once; offline, solar "
                        "cells from the package index)")
    p.add_argument("--out", default=None, help="default: runs/demo (runs/demo-2... when that holds a demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a demo (or any files of the same names) in --out")
    if full:
        add_config_options(p, exclude=["strategy"])
    p.set_defaults(func=cmd_demo)
