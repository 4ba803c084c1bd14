"""safetensors files: tensors plus string metadata, read without pickle and written atomically.

Every file headstart writes with tensors in it (checkpoints, run states, cached weights, cached
features) goes through `write_safetensors`; headstart's own kinds carry a JSON document under the
metadata key "headstart" whose "format" names the kind (`write_tagged` / `read_tagged`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from headstart.io.download import atomic_write

StateDict = dict[str, torch.Tensor]
KEY = "headstart"  # the metadata key of headstart's JSON


def read_safetensors(path: str | os.PathLike[str], *, tensors: bool = True) -> tuple[StateDict, dict[str, str]]:
    """Tensors (none with `tensors=False`: the header alone is read) and string metadata of a
    safetensors file; FileNotFoundError, or ValueError if it is malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return ({k: f.get_tensor(k) for k in f.keys()} if tensors else {}), meta
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e


def write_safetensors(path: str | os.PathLike[str], tensors: StateDict, metadata: dict[str, str]) -> Path:
    """Write CPU copies of `tensors` with `metadata`, atomically; returns the path."""
    cpu = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_write(path) as f:
        f.write(st_save(cpu, metadata=metadata))
    return Path(path)


def write_tagged(path: str | os.PathLike[str], tensors: StateDict, meta: dict[str, Any]) -> Path:
    """Write tensors with a headstart JSON document (`meta`, which names its "format")."""
    return write_safetensors(path, tensors, {KEY: json.dumps(meta, indent=2, default=str)})


def tagged_format(path: str | os.PathLike[str]) -> str | None:
    """The "format" of a headstart safetensors file, None for any other file (header only)."""
    try:
        _, raw = read_safetensors(path, tensors=False)
        meta = json.loads(raw.get(KEY, "{}"))
    except (ValueError, FileNotFoundError):
        return None
    return meta.get("format") if isinstance(meta, dict) else None


def read_tagged(path: str | os.PathLike[str], fmt: str, what: str, fix: str, *,
                tensors: bool = True) -> tuple[StateDict, dict[str, Any]]:
    """Tensors (unless `tensors=False`) and JSON document of a headstart file of format `fmt`;
    FileNotFoundError or ValueError naming `what` the file should be and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. {fix}")
    found, raw = read_safetensors(path, tensors=tensors)
    try:
        meta = json.loads(raw[KEY])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a headstart {what} (no valid {KEY!r} metadata). {fix}") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        kind = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not a headstart {what} (metadata format {kind!r}, not {fmt!r}). {fix}")
    return found, meta
