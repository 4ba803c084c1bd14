"""Checkpoints: `<name>.safetensors` (weights) + `<name>.json` (everything else), no pickle.

The JSON holds the architecture and its options, the class names, the preprocessing, and whatever
the caller adds (config, epoch, metrics). It is also embedded in the safetensors metadata, so the
weights file alone is enough to rebuild the model; the .json beside it is for people and tools.
Both are written atomically, the weights first.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from .download import atomic_write
from .models import create_model, get_head, get_model_info, resolve_weights
from .preprocessing import Preprocessing
from .weights import load_safetensors

FORMAT = "headstart-checkpoint"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    from . import __version__

    return {"headstart": __version__, "torch": torch.__version__, "python": platform.python_version()}


def checkpoint_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """`runs/x/best`, `runs/x/best.json` or `runs/x/best.safetensors` -> (weights, json)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, *, classes: list[str],
                    preprocessing: Preprocessing, **extra: Any) -> Path:
    """Write the model's weights and metadata; returns the .safetensors path."""
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
    text = json.dumps(meta, indent=2, default=str)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_write(weights_path) as f:
        f.write(st_save(tensors, metadata={"headstart": text}))
    with atomic_write(json_path, "w") as f:
        f.write(text + "\n")
    return weights_path


@dataclass
class Checkpoint:
    model: nn.Module  # in eval mode, on the CPU
    classes: list[str]
    preprocessing: Preprocessing
    meta: dict[str, Any]
    path: Path


def _read_headstart_file(path: Path, fmt: str, what: str, fix: str, *,
                         tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (unless `tensors=False`) and 'headstart' JSON metadata of a safetensors file whose
    metadata format is `fmt`."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}. {fix}")
    tensors, raw = load_safetensors(path, tensors=tensors)
    try:
        meta = json.loads(raw["headstart"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a headstart {what} (no valid 'headstart' metadata). {fix}") from e
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path} is not a headstart {what} (metadata format {found!r}, not {fmt!r}). {fix}")
    return tensors, meta


def read_checkpoint_meta(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint (`runs/x/best`, with or without extension)."""
    return _read_headstart_file(checkpoint_paths(path)[0], FORMAT, "checkpoint",
                                "Pass a run's best.safetensors or last.safetensors (written by `headstart "
                                "train`); plain weights go to `headstart train --weights`")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Rebuild the model of a checkpoint with its class names and preprocessing."""
    tensors, meta = read_checkpoint_meta(path)
    try:
        classes = meta["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"'classes' must be a non-empty list of names, got {classes!r:.100}")
        arch, kwargs = meta["arch"], dict(meta.get("arch_kwargs") or {})
        pre = Preprocessing.from_dict(meta["preprocessing"])
        get_model_info(arch)  # a clear error for an unknown architecture
        model = create_model(arch, num_classes=len(classes), **kwargs)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: malformed checkpoint metadata ({type(e).__name__}: {e})") from e
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit {arch} with {len(classes)} classes: {e}") from e
    return Checkpoint(model.eval(), classes, pre, meta, checkpoint_paths(path)[0])


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a headstart checkpoint (rather than a plain weights file)."""
    weights_path = checkpoint_paths(path)[0]
    if not weights_path.is_file():
        return False
    try:
        _, raw = load_safetensors(weights_path, tensors=False)
        return json.loads(raw.get("headstart", "{}")).get("format") == FORMAT
    except (ValueError, AttributeError):
        return False


def parse_classes(classes: str | list[str] | None) -> list[str] | None:
    """Class names from a list, a comma-separated string, or a text file with one name per line."""
    if classes is None or isinstance(classes, list):
        return classes
    path = Path(classes)
    if "," not in classes and path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        names = [c.strip() for c in classes.split(",")]
    if not names or not all(names) or len(set(names)) != len(names):
        raise ValueError(f"classes {classes!r:.200} must be distinct non-empty names, comma-separated "
                         "(e.g. dogs,wolves) or one per line in a file")
    return names


def open_model(path: str | os.PathLike[str], *, arch: str | None = None,
               classes: str | list[str] | None = None, default_classes: list[str] | None = None) -> Checkpoint:
    """A model ready for inference from a headstart checkpoint, or from any weights that
    `headstart train --weights` takes (a MindSpore .ckpt, a .pth, safetensors, a tag such as
    'imagenet' of the backbone `arch`), with their head.

    For a weights file, `arch` defaults to resnet50 and the preprocessing is the backbone's;
    `classes` names the head's outputs (default: `default_classes`, else the file's own names, else
    class_0, class_1...). For a checkpoint, `classes` may rename its classes (same count)."""
    names = parse_classes(classes)
    if is_checkpoint(path):
        ckpt = load_checkpoint(path)
        if arch is not None and arch != ckpt.meta.get("arch"):
            raise ValueError(f"{path} is a {ckpt.meta.get('arch')} checkpoint, not {arch}; drop --arch")
        if names is not None:
            if len(names) != len(ckpt.classes):
                raise ValueError(f"{len(names)} class names given for a checkpoint with {len(ckpt.classes)} "
                                 f"classes {ckpt.classes}")
            ckpt.classes = names
        return ckpt
    arch = arch or "resnet50"
    info = get_model_info(arch)
    if not Path(path).exists() and str(path) not in info.weights and not str(path).startswith(("http://", "https://")):
        raise FileNotFoundError(f"checkpoint not found: {path}. Pass a run's best.safetensors (written by `headstart "
                                f"train`), or with --weights a weights file or a tag of {arch} "
                                f"({', '.join(info.weights) or 'none'})")
    loaded = resolve_weights(arch, path)  # a file, or a tag such as 'imagenet'
    names = names or default_classes
    model = create_model(arch, weights=loaded)
    outputs = get_head(model, info.classifier).out_features
    if names is not None and len(names) != outputs:
        raise ValueError(f"{len(names)} class names ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) "
                         f"do not fit the {outputs} outputs of the weights in {path}; pass --classes with "
                         f"{outputs} names")
    names = names or model.pretrained_classes or [f"class_{i}" for i in range(outputs)]
    meta = {"arch": arch, "arch_kwargs": model.arch_kwargs, "source": str(path), "skipped_tensors": loaded.skipped}
    return Checkpoint(model.eval(), list(names), info.preprocessing, meta, Path(path))


# ---------------------------------------------------------------------------------------------
# Run state: everything needed to continue training, in one safetensors file (so it is consistent).

STATE_FORMAT = "headstart-run-state"


def save_run_state(path: str | os.PathLike[str], *, model_tensors: dict[str, torch.Tensor],
                   optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                   extra: dict[str, torch.Tensor] | None = None) -> Path:
    """Model tensors (all, or only those that train), optimizer state, the torch RNG, any `extra`
    tensors, and `meta` (JSON: epoch, scheduler state, history...), written atomically as one file."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_tensors.items()}
    tensors |= {f"extra.{k}": v.detach().cpu().contiguous() for k, v in (extra or {}).items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    text = json.dumps({"format": STATE_FORMAT, "optimizer_param_groups": opt["param_groups"], **meta}, default=str)
    path = Path(path)
    with atomic_write(path) as f:
        f.write(st_save(tensors, metadata={"headstart": text}))
    return path


def load_run_state(path: str | os.PathLike[str], *,
                   tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (none with `tensors=False`, for the metadata alone) and metadata of a run state;
    FileNotFoundError / ValueError with the fix."""
    return _read_headstart_file(Path(path), STATE_FORMAT, "run state",
                                "Pass the folder of a run started by `headstart train` (it writes "
                                "state.safetensors after every epoch)", tensors=tensors)


def restore_run_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], *, model: nn.Module | None = None,
                      optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load what `save_run_state` saved: the model's tensors (when `model` is given; a partial state,
    `meta["partial_model"]`, holds only those that train), and the optimizer's state with the torch
    RNG (when `optimizer` is given)."""
    if model is not None:
        model_sd = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        try:
            missing, unexpected = model.load_state_dict(model_sd, strict=False)
        except RuntimeError as e:
            raise ValueError(f"run state does not fit the model: {e}") from e
        if unexpected or (missing and not meta.get("partial_model")):
            raise ValueError(f"run state does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if optimizer is not None:
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, idx, name = k.split(".", 2)
                state.setdefault(int(idx), {})[name] = v
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
