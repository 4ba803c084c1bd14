"""`headstart models`: the registered backbones, their weights and stages."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say


def add_models(sub: Any, full: bool) -> None:
    """`headstart models`'s parser."""
    p = sub.add_parser("models", help="list the registered backbones and their weight sources",
                       description="List the registered backbones and their weight sources.")
    p.set_defaults(func=cmd_models)


def cmd_models(a: argparse.Namespace) -> int:
    from headstart.models import get_model_info, list_models, stage_names

    width = max(len(name) for name in list_models())
    for name in list_models():
        info = get_model_info(name)
        sources = ", ".join(f"{tag}={src.describe()}" for tag, src in info.weights.items()) or "none"
        say(f"{name:<{width}}  {info.description}\n{'':<{width}}  weights: {sources}\n"
            f"{'':<{width}}  stages (--train-from): {', '.join(stage_names(name))}")
    return 0
