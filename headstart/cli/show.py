"""`headstart show DATA`: a training batch drawn with its labels (`report.plots.show_batch`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say
from headstart.cli.options import TABLE_OPTIONS, add_config_options, table_columns


def cmd_show(a: argparse.Namespace) -> int:
    from headstart.report.plots import show_batch

    path = show_batch(a.data, out=a.out, batch_size=a.batch_size, seed=a.seed, image_size=a.image_size,
                      val_split=a.val_split, columns=table_columns(a), overwrite=a.overwrite)
    say(f"batch picture: {path}")
    return 0


def add_show(sub: Any, full: bool) -> None:
    """`headstart show`'s parser (`full`: see build_parser)."""
    p = sub.add_parser("show", help="draw a training batch with its labels",
                       description="Draw one augmented training batch of DATA, titled with the labels.")
    p.add_argument("data", help="dataset folder, or a table of labels (.csv, .tsv)")
    p.add_argument("--out", default="batch.png", help="picture to write (default: batch.png); it replaces only a "
                                                      "picture headstart drew")
    p.add_argument("--overwrite", action="store_true", help="replace whatever file --out names")
    p.add_argument("--batch-size", type=int, default=18)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--val-split", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    if full:
        add_config_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_show)
