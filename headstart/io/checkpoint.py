"""The checkpoint format: `<name>.safetensors` (weights) + `<name>.json` (everything else), no pickle.

The JSON holds the architecture and its options, the class names, the preprocessing, and whatever
the caller adds (config, epoch, metrics). It is also embedded in the safetensors metadata, so the
weights file alone is enough to rebuild the model; the .json beside it is for people and tools.
Both are written atomically, the weights first.

This module reads and writes the files; `models.open_model` builds the network from them.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from headstart.data.transforms import Preprocessing
from headstart.io.download import atomic_write
from headstart.io.formats.safetensors import StateDict, read_tagged, tagged_format, write_tagged
from headstart.version import __version__

FORMAT = "headstart-checkpoint"
FORMAT_VERSION = 1
STATE_FORMAT = "headstart-run-state"  # a run's state.safetensors (runstate.py): not a model
EXTRA_PREFIX = "limits."  # tensors that travel with the weights but are not the model's (analysis/confidence.py)
OWN_KEYS = ("format", "format_version", "arch", "arch_kwargs", "classes", "preprocessing", "versions")  # set here
_FIX = ("Pass a run's best.safetensors or last.safetensors (written by `headstart train`); plain weights go to "
        "`headstart train --weights`")


def versions() -> dict[str, str]:
    return {"headstart": __version__, "torch": torch.__version__, "python": platform.python_version()}


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """`runs/x/best`, `runs/x/best.json` or `runs/x/best.safetensors` -> (weights, json)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, *, classes: list[str],
                    preprocessing: Preprocessing, tensors: StateDict | None = None, **extra: Any) -> Path:
    """Write the model's weights (or `tensors`, its state dict with some entries replaced) and
    metadata; returns the .safetensors path."""
    weights_path, json_path = checkpoint_paths(path)
    arch = getattr(model, "arch", None)
    if arch is None:
        raise TypeError("the model has no `arch` attribute: build it with headstart.models.create_model")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "arch_kwargs": getattr(model, "arch_kwargs", {}),
        "classes": list(classes),
        "preprocessing": preprocessing.to_dict(),
        **extra,
        "versions": versions(),
    }
    write_tagged(weights_path, model.state_dict() if tensors is None else tensors, meta)
    with atomic_write(json_path, "w") as f:
        f.write(json.dumps(meta, indent=2, default=str) + "\n")
    return weights_path


def add_to_checkpoint(path: str | os.PathLike[str], *, tensors: StateDict | None = None, **meta: Any) -> Path:
    """Rewrite a checkpoint with more `tensors` (names outside the model's state dict, e.g.
    "limits.reference") and more metadata entries; returns the .safetensors path."""
    weights_path, json_path = checkpoint_paths(path)
    found, doc = read_checkpoint(weights_path)
    doc = {**doc, **meta}
    write_tagged(weights_path, {**found, **(tensors or {})}, doc)
    with atomic_write(json_path, "w") as f:
        f.write(json.dumps(doc, indent=2, default=str) + "\n")
    return weights_path


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a headstart checkpoint (rather than a plain weights file)."""
    return tagged_format(checkpoint_paths(path)[0]) == FORMAT


def read_checkpoint(path: str | os.PathLike[str], *, tensors: bool = True) -> tuple[StateDict, dict[str, Any]]:
    """Tensors (none with `tensors=False`) and metadata of a checkpoint (`runs/x/best`, with or
    without extension); FileNotFoundError / ValueError naming the fix."""
    return read_tagged(checkpoint_paths(path)[0], FORMAT, "checkpoint", _FIX, tensors=tensors)


class RunCheckpoints:
    """The checkpoints of one run folder (`best`, `last`), with the metadata they all carry."""

    def __init__(self, folder: Path, model: nn.Module, *, classes: list[str], preprocessing: Preprocessing,
                 meta: dict[str, Any], writes: bool = True) -> None:
        self.folder, self.model, self.meta = folder, model, meta
        self.classes, self.preprocessing = classes, preprocessing
        self.writes = writes  # False: `write` writes nothing (the ranks of a data-parallel run but rank 0)

    def write(self, name: str, *, tensors: StateDict | None = None, **meta: Any) -> Path:
        """`<folder>/<name>.safetensors` + .json of the model (or of `tensors`, see save_checkpoint)."""
        if not self.writes:
            return self.folder / f"{name}.safetensors"
        return save_checkpoint(self.folder / name, self.model, classes=self.classes, preprocessing=self.preprocessing,
                               tensors=tensors, **{**self.meta, **meta})

    def read(self, name: str) -> StateDict:
        """The model's state dict as checkpoint `name` holds it (without its "limits." tensors)."""
        return {k: v for k, v in read_checkpoint(self.folder / name)[0].items() if not k.startswith(EXTRA_PREFIX)}
