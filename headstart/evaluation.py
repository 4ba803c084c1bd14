"""`headstart evaluate`: the metrics of a model on a class-per-folder dataset."""

from __future__ import annotations

import os
from pathlib import Path

from .data import Sample, find_classes, make_samples
from .inference import INFERENCE_BATCH_SIZE, infer
from .metrics import Metrics, compute_metrics
from .models import open_model
from .runtime import resolve_runtime


def evaluate(checkpoint: str | os.PathLike[str], data: str | os.PathLike[str], *,
             batch_size: int = INFERENCE_BATCH_SIZE,
             workers: int = 2, precision: str = "auto", device: str = "auto",
             threads: int | None = None, compile: bool = False, engine: str = "auto", arch: str | None = None,
             classes: str | list[str] | None = None) -> Metrics:
    """Metrics of a checkpoint on a class-per-folder dataset: `data` itself, or its `val/` folder.

    Class folders are matched to the checkpoint's classes by name; a class the checkpoint does not
    know is an error. `checkpoint` may also be a weights file with its head (a MindSpore .ckpt...):
    its classes are then `classes` if given, else the class folders in sorted order.
    """
    folder = Path(data)
    if (folder / "val").is_dir():
        folder = folder / "val"
    present = find_classes(folder)
    ckpt = open_model(checkpoint, arch=arch, classes=classes, default_classes=present)
    unknown = sorted(set(present) - set(ckpt.classes))
    if unknown:
        raise ValueError(
            f"class folder(s) {unknown} in {folder} are not classes of the checkpoint {ckpt.classes}"
        )
    samples = [Sample(s.path, ckpt.classes.index(present[s.label])) for s in make_samples(folder, present)]
    runtime = resolve_runtime(device=device, precision=precision, threads=threads, compile=compile, engine=engine)
    inf = infer(ckpt.model, samples, runtime=runtime, pre=ckpt.preprocessing, batch_size=batch_size, workers=workers)
    metrics = compute_metrics(inf.outputs, inf.labels, ckpt.classes)
    metrics.skipped = [str(samples[i].path) for i, _ in inf.failed]
    return metrics
