"""`headstart similar CKPT IMAGE... --in DATA`: the training images nearest each image (`infer.similar`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say
from headstart.cli.options import TABLE_OPTIONS, add_config_options, table_columns


def cmd_similar(a: argparse.Namespace) -> int:
    from headstart.infer.similar import find_similar

    for result in find_similar(a.checkpoint, a.images, data=a.data, k=a.k, workers=a.workers, columns=table_columns(a)):
        say(result.path)
        if result.error:
            say(f"  error: {result.error}")
        for n in result.nearest:
            say(f"  {n.similarity:.3f}  {n.label:<12}  {n.path}")
    return 0


def add_similar(sub: Any, full: bool) -> None:
    """`headstart similar`'s parser (`full`: see build_parser)."""
    p = sub.add_parser("similar", help="the training images nearest to each image, by the model's backbone features",
                       description="For each IMAGE (files or folders), the K training images of DATA most similar by "
                                   "the checkpoint's backbone features (cosine): why a model sees an image as it does.")
    p.add_argument("checkpoint", help="a run's best.safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--in", dest="data", required=True, metavar="DATA",
                   help="the training images: a dataset (its train/ folder), a folder of images, or a table of "
                        "labels (its train rows)")
    p.add_argument("-k", type=int, default=5, help="images per query (default: 5)")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default: 2)")
    if full:
        add_config_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_similar)
