"""Conversion between headstart checkpoints and the weight formats users bring or need.

    headstart checkpoint (.safetensors + .json)  <->  plain safetensors  <->  torchvision .pth
                                                 <->  MindSpore .ckpt (the tutorial's ResNet)

Input is anything `models.open_model` reads. The output keeps the tensors exactly (float32 for
MindSpore); what a format cannot say (class names, preprocessing, padding) is reported in `notes`.
"""

from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import OWN_KEYS, save_checkpoint
from .download import atomic_write
from .formats.mindspore import encode_ckpt, torch_resnet_to_mindspore
from .models import open_model
from .weights import LoadedWeights, save_weights

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


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str | None = None,
            arch: str | None = None, classes: str | list[str] | None = None) -> Converted:
    """Read `src` (a checkpoint or weights file), write `dst` in format `to` (default: from its
    extension). `arch` and `classes` describe a plain weights file, as in `open_model`."""
    fmt = output_format(dst, to)
    ckpt = open_model(src, arch=arch, classes=classes)
    skipped = list(ckpt.meta.get("skipped_tensors", []))
    arch_name, kwargs = ckpt.meta["arch"], dict(ckpt.meta.get("arch_kwargs") or {})
    sd = ckpt.model.state_dict()
    notes: list[str] = []
    dst = Path(dst)
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
        notes.append("a .pth holds tensors only: class names and preprocessing are not in it")
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
