"""`headstart evaluate`: the metrics of a model on a class-per-folder dataset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .confidence import checkpoint_temperature
from .data import Sample, find_classes, make_samples
from .export import exported_logits, int8_if_faster, int8_model, is_exported, open_exported
from .inference import INFERENCE_BATCH_SIZE, infer
from .metrics import Metrics, compute_metrics
from .models import open_model
from .outputs import Kind, json_by, write_output
from .runtime import resolve_runtime

METRICS_JSON = Kind("a JSON written by headstart evaluate", json_by("evaluate"))


def write_metrics_json(path: str | os.PathLike[str], metrics: Metrics, *, overwrite: bool = False) -> Path:
    """`evaluate --json FILE`. Replaces only a JSON headstart evaluate wrote (outputs.claim), unless `overwrite`."""
    from . import __version__

    with write_output(path, METRICS_JSON, mode="w", overwrite=overwrite) as f:
        f.write(json.dumps({"written_by": f"headstart evaluate {__version__}", **metrics.to_dict()}, indent=2) + "\n")
    return Path(path)


def evaluate(checkpoint: str | os.PathLike[str], data: str | os.PathLike[str], *,
             batch_size: int = INFERENCE_BATCH_SIZE,
             workers: int = 2, precision: str = "auto", device: str = "auto",
             threads: int | None = None, compile: bool = False, engine: str = "auto", arch: str | None = None,
             classes: str | list[str] | None = None) -> Metrics:
    """Metrics of a checkpoint on a class-per-folder dataset: `data` itself, or its `val/` folder.

    Class folders are matched to the checkpoint's classes by name; a class the checkpoint does not
    know is an error. `checkpoint` may also be a weights file with its head (a MindSpore .ckpt...):
    its classes are then `classes` if given, else the class folders in sorted order. A file written by
    `headstart export` runs on its own runtime; precision="int8" quantizes the checkpoint (NNCF).
    The loss and calibration error are of the probabilities at the checkpoint's temperature.
    """
    folder = Path(data)
    if (folder / "val").is_dir():
        folder = folder / "val"
    present = find_classes(folder)
    model = (int8_model(checkpoint, images=[folder], arch=arch, classes=classes) if precision == "int8"
             else open_exported(checkpoint) if is_exported(checkpoint)
             else int8_if_faster(checkpoint, arch=arch, classes=classes)
             if precision == "auto" and engine != "torch" and device in ("auto", "cpu") else None)
    if model is not None:  # run by OpenVINO or onnxruntime
        names, temperature = model.classes, model.temperature
    else:
        ckpt = open_model(checkpoint, arch=arch, classes=classes, default_classes=present)
        names = ckpt.classes
        temperature = checkpoint_temperature(ckpt.meta)
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise ValueError(f"class folder(s) {unknown} in {folder} are not classes of the checkpoint {names}")
    samples = [Sample(s.path, names.index(present[s.label])) for s in make_samples(folder, present)]
    if model is not None:
        logits, order, failed = exported_logits(model, samples, batch_size=batch_size, workers=workers)
        outputs, labels = torch.from_numpy(logits), torch.tensor([samples[i].label for i in order], dtype=torch.long)
    else:
        runtime = resolve_runtime(device=device, precision=precision, threads=threads, compile=compile, engine=engine)
        inf = infer(ckpt.model, samples, runtime=runtime, pre=ckpt.preprocessing, batch_size=batch_size,
                    workers=workers)
        outputs, labels, failed = inf.outputs, inf.labels, inf.failed
    metrics = compute_metrics(outputs / temperature, labels, names)  # probabilities at the checkpoint's temperature
    metrics.skipped = [str(samples[i].path) for i, _ in failed]
    return metrics
