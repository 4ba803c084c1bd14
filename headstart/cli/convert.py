"""`headstart convert IN OUT`: weights or a checkpoint in another format (`export.convert`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say


def add_convert(sub: Any, full: bool) -> None:
    """`headstart convert`'s parser."""
    p = sub.add_parser("convert", help="convert weights or a checkpoint: headstart, safetensors, .pth, MindSpore .ckpt",
                       description="Convert IN to OUT. IN: a headstart checkpoint or a weights file (.ckpt, .pth, "
                                   ".safetensors, model.json). OUT's format comes from its extension (.safetensors: "
                                   "headstart checkpoint, .pth/.pt: torchvision state dict, .ckpt: MindSpore "
                                   "tutorial ResNet) unless --to says otherwise.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--to", default=None, choices=["headstart", "safetensors", "pth", "mindspore"],
                   help="output format (default: from OUT's extension); safetensors = plain weights")
    p.add_argument("--arch", default=None, help="backbone of a plain weights file IN (default: resnet50)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="names of the head's outputs, comma-separated or a file with one per line")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever file OUT names (else it replaces only a file of its format headstart wrote)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(a: argparse.Namespace) -> int:
    from headstart.export.convert import convert

    result = convert(a.input, a.output, to=a.to, arch=a.arch, classes=a.classes, overwrite=a.overwrite)
    say(f"wrote {result.path} ({result.format}: {result.tensors} tensors, {result.arch}, "
        f"{len(result.classes)} classes)")
    if result.skipped:
        say(f"skipped {len(result.skipped)} tensors that are not weights: {', '.join(result.skipped[:10])}"
            f"{' ...' if len(result.skipped) > 10 else ''}")
    for note in result.notes:
        say(f"note: {note}")
    return 0
