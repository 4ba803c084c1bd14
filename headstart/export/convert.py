"""Conversion between headstart checkpoints and the weight formats users bring or need.

    headstart checkpoint (.safetensors + .json)  <->  plain safetensors  <->  torchvision .pth
                                                 <->  MindSpore .ckpt (the tutorial's ResNet)

Input is anything `models.open_model` reads. The output keeps the tensors exactly (float32 for
MindSpore); what a format cannot say (class names, preprocessing, padding) is reported in `notes`.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from headstart.io.checkpoint import FORMAT as CHECKPOINT_FORMAT
from headstart.io.checkpoint import OWN_KEYS, checkpoint_paths, save_checkpoint
from headstart.io.download import atomic_write
from headstart.io.formats.mindspore import encode_ckpt, torch_resnet_to_mindspore
from headstart.io.formats.safetensors import read_safetensors, tagged_format
from headstart.io.outputs import Kind, claim
from headstart.io.weights import PTH_OPTIONS_FORMAT, WEIGHTS_FORMAT, LoadedWeights, pth_options_path, save_weights
from headstart.models import open_model

log = logging.getLogger(__name__)

FORMATS = ("headstart", "safetensors", "pth", "mindspore")
_BY_SUFFIX = {".safetensors": "headstart", ".pth": "pth", ".pt": "pth", ".ckpt": "mindspore"}


@dataclass
class Converted:
    path: Path
    format: str
    arch: str
    classes: list[str]
    tensors: int
    skipped: list[str] = field(default_factory=list)  # input tensors that were not weights
    notes: list[str] = field(default_factory=list)  # what the output format loses or changes


def output_format(path: str | os.PathLike[str], to: str | None = None) -> str:
    """The format to write: `to`, else from the extension."""
    if to is not None:
        if to not in FORMATS:
            raise ValueError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
        return to
    suffix = Path(path).suffix.lower()
    if suffix not in _BY_SUFFIX:
        raise ValueError(f"cannot tell the output format from {str(path)!r}: use an extension among "
                         f"{', '.join(_BY_SUFFIX)} or pass --to ({', '.join(FORMATS)})")
    return _BY_SUFFIX[suffix]


def _is_tagged(fmt: str) -> Callable[[Path], bool]:
    return lambda path: tagged_format(path) == fmt


def _is_weights(path: Path) -> bool:
    try:
        return read_safetensors(path, tensors=False)[1].get("format") == WEIGHTS_FORMAT
    except (ValueError, OSError):
        return False


def _is_pth(path: Path) -> bool:
    try:
        return json.loads(pth_options_path(path).read_text()).get("format") == PTH_OPTIONS_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


KINDS = {  # what `convert` writes, and how it knows its own files (outputs.claim)
    "headstart": Kind("a headstart checkpoint", _is_tagged(CHECKPOINT_FORMAT), lambda p: [checkpoint_paths(p)[1]]),
    "safetensors": Kind("a weights file written by headstart", _is_weights),
    "pth": Kind("a .pth written by headstart convert", _is_pth, lambda p: [pth_options_path(p)]),
    "mindspore": Kind("a MindSpore checkpoint written by headstart convert", lambda p: False),  # no mark inside
}


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str | None = None,
            arch: str | None = None, classes: str | list[str] | None = None, overwrite: bool = False) -> Converted:
    """Read `src` (a checkpoint or weights file), write `dst` in format `to` (default: from its
    extension). `arch` and `classes` describe a plain weights file, as in `open_model`. `dst`
    replaces only a file of the same format that headstart wrote (outputs.claim), unless `overwrite`.

    A .pth holds tensors only: `X.pth.json` beside it keeps the architecture, its options (a Keras
    ResNet50's stride_in_1x1, which the tensors cannot show), the classes and the preprocessing, and
    headstart reads it back with the .pth."""
    fmt = output_format(dst, to)
    dst = Path(checkpoint_paths(dst)[0] if fmt == "headstart" else dst)
    claim(dst, KINDS[fmt], overwrite=overwrite)
    ckpt = open_model(src, arch=arch, classes=classes)
    skipped = list(ckpt.meta.get("skipped_tensors", []))
    arch_name, kwargs = ckpt.meta["arch"], dict(ckpt.meta.get("arch_kwargs") or {})
    sd = ckpt.model.state_dict()
    notes: list[str] = []
    if fmt == "headstart":  # OUT.safetensors + OUT.json; a checkpoint's training metadata carried over
        carried = {k: v for k, v in ckpt.meta.items() if k not in OWN_KEYS} if ckpt.meta.get("format") else {}
        dst = save_checkpoint(dst, ckpt.model, classes=ckpt.classes, preprocessing=ckpt.preprocessing,
                              tensors={**ckpt.model.state_dict(), **ckpt.extra} if carried else None,
                              **{**carried, "converted_from": str(src)})
    elif fmt == "safetensors":
        save_weights(dst, LoadedWeights(dict(sd), kwargs, ckpt.classes, source=str(src)))
    elif fmt == "pth":
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in sd.items()}, buf)
        with atomic_write(dst) as f:
            f.write(buf.getvalue())
        with atomic_write(pth_options_path(dst), "w") as f:
            json.dump({"format": PTH_OPTIONS_FORMAT, "arch": arch_name, "arch_kwargs": kwargs,
                       "classes": ckpt.classes, "preprocessing": ckpt.preprocessing.to_dict(),
                       "converted_from": str(src)}, f, indent=2)
        notes.append(f"the architecture, its options, the class names and the preprocessing are in "
                     f"{pth_options_path(dst).name} beside it; headstart reads it with the .pth")
        if kwargs:
            notes.append(f"the network was built with {kwargs}; torchvision's own {arch_name} is not, "
                         "so load this file into headstart's (or an equivalent) model")
    else:
        notes += _mindspore_notes(arch_name, kwargs)
        with atomic_write(dst) as f:
            f.write(encode_ckpt(torch_resnet_to_mindspore(sd)))
        notes.append(f"class order for the MindSpore head: {', '.join(ckpt.classes[:10])}"
                     f"{' ...' if len(ckpt.classes) > 10 else ''}")
    log.info("converted %s -> %s (%s)", src, dst, fmt)
    tensors = len(sd) - (sum(k.endswith("num_batches_tracked") for k in sd) if fmt == "mindspore" else 0)
    return Converted(dst, fmt, arch_name, list(ckpt.classes), tensors, skipped, notes)


def _mindspore_notes(arch: str, kwargs: dict) -> list[str]:
    """Refuse what the tutorial's network cannot hold; say what changes."""
    if not arch.startswith("resnet"):
        raise ValueError(f"{arch} has no MindSpore layout here: only ResNets convert to the MindSpore tutorial's "
                         "network; write .safetensors or .pth instead")
    if kwargs.get("stride_in_1x1"):
        raise ValueError(f"this {arch} has its stride in the first 1x1 conv (Keras/Caffe 'v1' weights); the "
                         "MindSpore tutorial's network strides in the 3x3 conv, so it cannot hold these weights. "
                         "Start from MindSpore or torchvision weights (--weights) to get a convertible model")
    if kwargs.get("padding") != "same":
        return [f"this {arch} pads its strided layers symmetrically (torchvision's way); MindSpore's pad_mode='same' "
                "pads them asymmetrically, so its logits will differ somewhat from headstart's"]
    return []
