"""The options commands share: the flags derived from TrainConfig's fields (declared once, in
training/config.py), the inference options, the model given (a checkpoint, --weights or --model),
and DATA as a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Iterable

# ---------------------------------------------------------------------------------------------
# Commands.

def train_config(a: argparse.Namespace, **override: Any):
    """The TrainConfig of the parsed flags (every field that has one), with `override`."""
    from headstart.training import TrainConfig

    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    return TrainConfig(**{**given, **override})


def given_options(a: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line (those that differ from their default)."""
    from headstart.training import TrainConfig

    return {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)
            if hasattr(a, f.name) and getattr(a, f.name) != f.default}


TABLE_OPTIONS = ("path_column", "label_column", "allow_outside")  # DATA as a table of labels: TrainConfig's fields


def table_columns(a: argparse.Namespace) -> Any:
    """How DATA is read where it is a table of labels (data.Columns), from the table options."""
    from headstart.data import Columns

    return Columns(getattr(a, "path_column", None), getattr(a, "label_column", None),
                   getattr(a, "allow_outside", False))


def model_file(a: argparse.Namespace, checkpoint: str | None) -> str:
    """The checkpoint, --weights or --model (an exported file); exactly one of them."""
    given = [v for v in (checkpoint, a.weights, getattr(a, "model", None)) if v]
    if len(given) > 1:
        raise ValueError(f"give one model: a checkpoint, --weights or --model, not {' and '.join(given)}")
    if not given:
        raise ValueError("which model? pass a checkpoint (a run's best.safetensors), --weights FILE, or --model "
                         "F.onnx (written by `headstart export`)")
    if checkpoint and a.arch:
        raise ValueError("--arch goes with --weights; a checkpoint knows its architecture")
    return given[0]


# ---------------------------------------------------------------------------------------------
# Parser.

RUNTIME_OPTIONS = ("precision", "device", "workers", "threads", "compile", "engine")  # inference commands take these


def add_config_options(p: argparse.ArgumentParser, names: Iterable[str] | None = None, *,
                 exclude: Iterable[str] = ()) -> None:
    """A flag for each of TrainConfig's fields (all, or `names`, less `exclude`), with the field's
    type, default, choices and help: an option is declared once, in training.TrainConfig."""
    from headstart.training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if (names is not None and f.name not in names) or f.name in exclude:
            continue
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        text = f.metadata["help"]
        text = (text() if callable(text) else text).replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", help=f"{text} (default: off)")
            continue
        if f.default is not None or "default" not in text:
            text += f" (default: {'none' if f.default is None else f.default})"
        parse = f.metadata["parse"]
        p.add_argument(flag, type=argument_type(parse) if parse else kind, default=f.default,
                       choices=f.metadata["choices"], help=text)


def add_inference_options(p: argparse.ArgumentParser) -> None:
    from headstart.runtime.inference import INFERENCE_BATCH_SIZE

    p.add_argument("--batch-size", type=int, default=INFERENCE_BATCH_SIZE,
                   help=f"images per batch (default: {INFERENCE_BATCH_SIZE})")
    add_precision(p)
    add_config_options(p, RUNTIME_OPTIONS, exclude=["precision"])


def add_precision(p: argparse.ArgumentParser) -> None:
    from headstart.runtime.device import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 where the CPU or GPU supports it, else fp32 (or an int8 model made before, "
                        "where it ran faster and the CPU has no bf16); int8: the model quantized by NNCF, made once "
                        "and cached (calibrated on the run's training images and checked on its validation images; "
                        "outside a run folder, on the images given), run by OpenVINO; needs pip install "
                        "'headstart[int8]' (default: auto)")


def add_reject(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reject", default="auto", metavar="off|auto|VALUE",
                   help="call an image `unknown` when it looks unlike the training data: its familiarity (the share "
                        "of validation images that look less familiar) is under VALUE; auto: the checkpoint's "
                        "threshold, fitted to reject 5%% of its validation images; off: never (needed with "
                        "--precision int8, which computes no features) (default: auto)")


def add_weights_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="instead of a checkpoint: weights with their head: a file or URL (MindSpore .ckpt, .pth, "
                        ".safetensors) or a tag of --arch such as imagenet")
    p.add_argument("--arch", default=None, help="backbone of --weights (default: resnet50)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="names of the head's outputs, comma-separated or a file with one per line")


def argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for argparse: its ValueError's own words (which name the format) as the error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def parse_size(text: str) -> int:
    """Bytes in '8MB', '512kB', '1GB' or a plain number."""
    units = {"gb": 2**30, "mb": 2**20, "kb": 2**10, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8MB, 512kB or 1048576")
