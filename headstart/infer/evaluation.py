"""`headstart evaluate`: the metrics of a model on a class-per-folder dataset (Classifier.evaluate)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from headstart.analysis.metrics import Metrics
from headstart.data import Columns, evaluation_samples
from headstart.infer.opening import load
from headstart.io.outputs import Kind, json_by, write_output
from headstart.runtime.inference import INFERENCE_BATCH_SIZE
from headstart.version import __version__

METRICS_JSON = Kind("a JSON written by headstart evaluate", json_by("evaluate"))


def write_metrics_json(path: str | os.PathLike[str], metrics: Metrics, *, overwrite: bool = False) -> Path:
    """`evaluate --json FILE`. Replaces only a JSON headstart evaluate wrote (outputs.claim), unless `overwrite`."""
    with write_output(path, METRICS_JSON, mode="w", overwrite=overwrite) as f:
        f.write(json.dumps({"written_by": f"headstart evaluate {__version__}", **metrics.to_dict()}, indent=2) + "\n")
    return Path(path)


def evaluate(checkpoint: str | os.PathLike[str], data: str | os.PathLike[str], *,
             columns: Columns | None = None, batch_size: int = INFERENCE_BATCH_SIZE,
             workers: int = 2, precision: str = "auto", device: str = "auto",
             threads: int | None = None, compile: bool = False, engine: str = "auto", arch: str | None = None,
             classes: str | list[str] | None = None) -> Metrics:
    """Metrics of a model on a class-per-folder dataset (`data` itself, or its `val/` folder), or
    on a table of labels (its val rows where it has a split column, else every row; `columns`).

    Class folders are matched to the model's classes by name; a class the model does not know is
    an error. `checkpoint` may also be a weights file with its head (a MindSpore .ckpt...): its
    classes are then `classes` if given, else the class folders in sorted order; or an exported
    file. precision="int8" runs the checkpoint's int8 copy (made on first use). The loss and
    calibration error are of the probabilities at the model's temperature."""
    present, samples = evaluation_samples(data, columns=columns)
    model = load(checkpoint, precision=precision, engine=engine, device=device, threads=threads, compile=compile,
                 reject="off", arch=arch, classes=classes, default_classes=present,
                 calibration=[s.path for s in samples])
    return model.evaluate_samples(present, samples, where=str(data), batch_size=batch_size, workers=workers)
