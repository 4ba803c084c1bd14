"""`headstart weights [fetch NAME]`: the weight sources and whether each is cached; fetch one."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import download_bar, say


def add_weights(sub: Any, full: bool) -> None:
    """`headstart weights`'s parser."""
    p = sub.add_parser("weights", help="list weight sources and whether each is cached; fetch one",
                       description="List every backbone's weight sources and whether each is in the cache, or "
                                   "`fetch NAME [--tag TAG]` to download, verify and convert one now.")
    p.add_argument("action", nargs="?", default="list", choices=["list", "fetch"])
    p.add_argument("name", nargs="?", help="backbone, for fetch (e.g. resnet50)")
    p.add_argument("--tag", default="imagenet", help="which of its sources (default: imagenet)")
    p.set_defaults(func=cmd_weights)


def cmd_weights(a: argparse.Namespace) -> int:
    from headstart.io.download import cache_dir
    from headstart.models import fetch_weights, weight_sources

    if a.action == "fetch":
        if not a.name:
            raise ValueError("which weights? e.g. `headstart weights fetch resnet50` (see `headstart weights`)")
        say(f"{a.name} {a.tag}: {fetch_weights(a.name, a.tag, progress=download_bar())}")
        return 0
    say(f"cache: {cache_dir()}")
    sources = weight_sources()
    width = max(len(name) for name, *_ in sources)
    for name, tag, src, cached in sources:
        say(f"{name:<{width}}  {tag:<12} {'cached ' if cached else 'not yet'}  {src.describe()}")
    return 0
