"""`headstart export CKPT`: ONNX or OpenVINO, checked on real images (`export.export`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say
from headstart.cli.options import add_weights_file, model_file


def add_export(sub: Any, full: bool) -> None:
    """`headstart export`'s parser."""
    p = sub.add_parser("export", help="export a model with its preprocessing to ONNX or OpenVINO, checked on real images",
                       description="Write CKPT as ONNX (--format onnx) or OpenVINO IR (--format openvino): uint8 "
                                   "(N, S, S, 3) RGB crops in, logits and probabilities out, normalisation inside, "
                                   "classes and preprocessing in its metadata. Every export is checked against "
                                   "headstart's own inference on real images (the run's validation images, or "
                                   "--images) and removed if they disagree.")
    p.add_argument("checkpoint", nargs="?", help="a run's best.safetensors (or --weights)")
    p.add_argument("--format", default=None, choices=["onnx", "openvino"],
                   help="default: from --out's suffix (.onnx, .xml), else onnx")
    p.add_argument("--out", default=None, help="the file to write (default: beside CKPT, .onnx or .xml); it replaces "
                                               "only an export of the same format")
    p.add_argument("--overwrite", action="store_true", help="replace whatever file --out names")
    p.add_argument("--images", nargs="+", default=[], metavar="PATH",
                   help="images (files or folders) to check the export on (default: the run's validation images)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8 (with --format openvino): weights and activations quantized by NNCF, calibrated on "
                        "--calibration; the check then allows validation accuracy 0.5 points below fp32 at most "
                        "(default: fp32)")
    p.add_argument("--calibration", nargs="+", default=[], metavar="PATH",
                   help="int8: images to set the quantization ranges on (default: 300 of the run's training "
                        "images, else --images)")
    add_weights_file(p)
    p.set_defaults(func=cmd_export)


def cmd_export(a: argparse.Namespace) -> int:
    from headstart.export.writers import export

    result = export(model_file(a, a.checkpoint), format=a.format, out=a.out, images=a.images,
                    precision=a.precision, calibration=a.calibration, arch=a.arch, classes=a.classes,
                    overwrite=a.overwrite)
    say(f"wrote {', '.join(map(str, result.files))} ({result.format}: {len(result.classes)} classes)")
    say(result.parity.line())
    return 0
