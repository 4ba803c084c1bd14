"""Prediction with a trained checkpoint: its class names and its eval preprocessing, nothing retyped."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .data import Sample, collect_files  # noqa: F401  (collect_files: part of this module's API too)
from .export import exported_logits, int8_if_faster, int8_model, is_exported, open_exported
from .inference import INFERENCE_BATCH_SIZE, infer
from .models import open_model
from .runtime import resolve_runtime


@dataclass
class Prediction:
    path: str
    label: str | None  # None when the file could not be read as an image
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def predict(checkpoint: str | os.PathLike[str], paths: Iterable[str | os.PathLike[str]], *, top_k: int = 5,
            batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 2, precision: str = "auto", device: str = "auto",
            threads: int | None = None, compile: bool = False, engine: str = "auto", arch: str | None = None,
            classes: str | list[str] | None = None,
            on_batch: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Class, probability and top-k for every image under `paths`; unreadable files get an `error`.

    `checkpoint` is a headstart checkpoint or a weights file with its head (a MindSpore .ckpt...;
    `arch` and `classes` as in `models.open_model`), or a file written by `headstart export`
    (.onnx, OpenVINO .xml), run by its own runtime with the classes and preprocessing it holds.
    precision="int8": the checkpoint quantized by NNCF (see `export.int8_model`), run by OpenVINO;
    "auto" uses that int8 model where `export.int8_if_faster` says so."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    paths = list(paths)
    # the model first: a wrong checkpoint path is reported before the image folders are walked
    if precision == "int8":  # quantized once (NNCF), then run by OpenVINO
        exported = int8_model(checkpoint, images=paths, arch=arch, classes=classes)
    elif is_exported(checkpoint):
        exported = open_exported(checkpoint)
    elif precision == "auto" and engine != "torch" and device in ("auto", "cpu"):
        # an int8 model made before, where it passed its gate and ran faster (CPUs without bf16)
        exported = int8_if_faster(checkpoint, arch=arch, classes=classes)
    else:
        exported = None
    ckpt = None if exported else open_model(checkpoint, arch=arch, classes=classes)
    files = collect_files(paths)
    samples = [Sample(p, -1) for p in files]
    if exported is not None:
        out, order, failed = exported_logits(exported, samples, batch_size=batch_size, workers=workers)
        names, logits, indices = exported.classes, torch.from_numpy(out), order
    else:
        runtime = resolve_runtime(device=device, precision=precision, threads=threads, compile=compile, engine=engine)
        inf = infer(ckpt.model, samples, runtime=runtime, pre=ckpt.preprocessing, batch_size=batch_size,
                    workers=workers, on_batch=on_batch)
        names, logits, indices, failed = ckpt.classes, inf.outputs, inf.indices.tolist(), inf.failed
    return _predictions(files, names, logits, indices, failed, min(top_k, len(names)))


def _predictions(files: list[Path], classes: list[str], logits: torch.Tensor, indices: list[int],
                 failed: list[tuple[int, str]], k: int) -> list[Prediction]:
    """A Prediction per file, in the order of `files`: top-k of the softmax, or the decoding error."""
    results = {index: Prediction(str(files[index]), None, 0.0, [], f"not a readable image ({reason})")
               for index, reason in failed}
    if len(indices):
        values, best = logits.float().softmax(1).topk(k, dim=1)
        for index, v, i in zip(indices, values.tolist(), best.tolist()):
            top = [(classes[j], p) for j, p in zip(i, v)]
            results[index] = Prediction(str(files[index]), top[0][0], top[0][1], top)
    return [results[index] for index in sorted(results)]
