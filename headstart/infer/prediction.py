"""`headstart predict`: a trained model's answers for image files and folders, through the one
Classifier (classifier.py) that opens it: its class names, eval preprocessing, temperature
(calibrated probabilities) and unknown-image test, nothing retyped."""

from __future__ import annotations

import os
from typing import Callable, Iterable

from headstart.data import as_paths, collect_files  # noqa: F401  (part of this module's API too)
from headstart.infer.classifier import Prediction
from headstart.infer.decode import check_top_k
from headstart.infer.opening import load
from headstart.runtime.inference import INFERENCE_BATCH_SIZE

__all__ = ["Prediction", "predict", "collect_files"]


def predict(checkpoint: str | os.PathLike[str], paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
            top_k: int = 5,
            batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 2, precision: str = "auto", device: str = "auto",
            threads: int | None = None, compile: bool = False, engine: str = "auto", arch: str | None = None,
            classes: str | list[str] | None = None, reject: str | float = "auto",
            on_batch: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Class, probability and top-k for every image under `paths` (files, folders); unreadable files
    get an `error`. `load(checkpoint, ...)` then `Classifier.predict`: see `classifier.load` for the
    model (a checkpoint, a weights file with `arch` and `classes`, an exported .onnx/.xml), the
    precision (int8: the checkpoint's int8 copy, made on first use on the run's images, else on
    these), the engine and `reject` (the unknown-image test: auto, off, or a threshold)."""
    check_top_k(top_k)  # (before the model is opened)
    paths = as_paths(paths)
    # the model first: a wrong checkpoint path is reported before the image folders are walked
    model = load(checkpoint, precision=precision, engine=engine, device=device, threads=threads, compile=compile,
                 reject=reject, arch=arch, classes=classes, calibration=paths)
    return model.predict(collect_files(paths), top_k=top_k, batch_size=batch_size, workers=workers,
                         on_batch=on_batch)
