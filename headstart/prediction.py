"""Prediction with a trained checkpoint: its class names, its eval preprocessing, its temperature
(calibrated probabilities) and its unknown-image test (confidence.py), nothing retyped."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from .data import Sample, as_paths, collect_files  # noqa: F401  (collect_files: part of this module's API too)
from .export import exported_logits, int8_if_faster, int8_model, is_exported, open_exported
from .confidence import REFERENCE, checkpoint_rejection, checkpoint_temperature, energy, nearest_similarity
from .inference import INFERENCE_BATCH_SIZE, infer
from .limits import outputs, tests_unknown
from .models import open_model
from .runtime import resolve_runtime


@dataclass
class Prediction:
    path: str
    label: str | None  # None when the file could not be read as an image
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    familiarity: float | None = None  # share of validation images less familiar (None: no unknown-image test)
    unknown: bool = False  # familiarity under the threshold: `label` is "unknown", top_k still the classes'


def predict(checkpoint: str | os.PathLike[str], paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *,
            top_k: int = 5,
            batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 2, precision: str = "auto", device: str = "auto",
            threads: int | None = None, compile: bool = False, engine: str = "auto", arch: str | None = None,
            classes: str | list[str] | None = None, reject: str | float = "auto",
            on_batch: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Class, probability and top-k for every image under `paths`; unreadable files get an `error`.

    `checkpoint` is a headstart checkpoint or a weights file with its head (a MindSpore .ckpt...;
    `arch` and `classes` as in `models.open_model`), or a file written by `headstart export`
    (.onnx, OpenVINO .xml), run by its own runtime with the classes and preprocessing it holds.
    precision="int8": the checkpoint quantized by NNCF (see `export.int8_model`), run by OpenVINO;
    "auto" uses that int8 model where `export.int8_if_faster` says so.

    Probabilities are at the checkpoint's temperature (fitted on validation by `train`). `reject`:
    "auto" calls an image `unknown` below the checkpoint's familiarity threshold (rejecting about 5%
    of its validation images), a number in (0, 1) is such a threshold, "off" never does; a
    checkpoint from before this test, a weights file or an export has none ("auto" is then "off")."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    threshold_given = _threshold(reject)
    paths = as_paths(paths)  # (one path, or several)
    # the model first: a wrong checkpoint path is reported before the image folders are walked
    if precision == "int8":  # quantized once (NNCF), then run by OpenVINO
        exported = int8_model(checkpoint, images=paths, arch=arch, classes=classes)
    elif is_exported(checkpoint):
        exported = open_exported(checkpoint)
    elif precision == "auto" and engine != "torch" and device in ("auto", "cpu") and \
            (reject == "off" or not tests_unknown(checkpoint)):
        # an int8 model made before, where it passed its gate and ran faster (CPUs without bf16)
        exported = int8_if_faster(checkpoint, arch=arch, classes=classes)
    else:
        exported = None
    ckpt = None if exported else open_model(checkpoint, arch=arch, classes=classes)
    rejection = checkpoint_rejection(ckpt.meta, ckpt.extra) if ckpt else None
    if threshold_given is not None and rejection is None:
        raise ValueError(f"--reject {reject} needs a checkpoint with an unknown-image test; {checkpoint} has none "
                         "(a run's best.safetensors written by this headstart's `train` has one). Use --reject off")
    files = collect_files(paths)
    samples = [Sample(p, -1) for p in files]
    familiarity = None
    if exported is not None:
        out, order, failed = exported_logits(exported, samples, batch_size=batch_size, workers=workers)
        names, logits, indices, temperature = exported.classes, torch.from_numpy(out), order, exported.temperature
    else:
        runtime = resolve_runtime(device=device, precision=precision, threads=threads, compile=compile, engine=engine)
        names, temperature = ckpt.classes, checkpoint_temperature(ckpt.meta)
        if rejection is not None and reject != "off":  # features and logits in one pass
            feats, logits = outputs(ckpt.model, samples, runtime=runtime, pre=ckpt.preprocessing,
                                    batch_size=batch_size, workers=workers, on_batch=on_batch)
            indices, failed = feats.indices.tolist(), feats.failed
            familiarity = rejection.familiarity(nearest_similarity(feats.features, ckpt.extra[REFERENCE]),
                                                energy(logits, temperature))
        else:
            inf = infer(ckpt.model, samples, runtime=runtime, pre=ckpt.preprocessing, batch_size=batch_size,
                        workers=workers, on_batch=on_batch)
            logits, indices, failed = inf.outputs, inf.indices.tolist(), inf.failed
    threshold = threshold_given if threshold_given is not None else rejection.threshold if familiarity is not None \
        else None
    return _predictions(files, names, logits / temperature, indices, failed, min(top_k, len(names)),
                        familiarity=familiarity, threshold=threshold)


def _threshold(reject: str | float) -> float | None:
    """`reject` as a familiarity threshold: None for "auto" (the checkpoint's) and "off"."""
    if reject in ("auto", "off"):
        return None
    try:
        value = float(reject)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value < 1:
        raise ValueError(f"reject must be off, auto or a familiarity threshold between 0 and 1 (e.g. 0.05: about 5% "
                         f"of the validation images called unknown), got {reject!r}")
    return value


def _predictions(files: list[Path], classes: list[str], logits: torch.Tensor, indices: list[int],
                 failed: list[tuple[int, str]], k: int, *, familiarity: torch.Tensor | None = None,
                 threshold: float | None = None) -> list[Prediction]:
    """A Prediction per file, in the order of `files`: top-k of the softmax (and the familiarity,
    "unknown" under `threshold`), or the decoding error."""
    results = {index: Prediction(str(files[index]), None, 0.0, [], f"not a readable image ({reason})")
               for index, reason in failed}
    if len(indices):
        values, best = logits.float().softmax(1).topk(k, dim=1)
        known = familiarity.tolist() if familiarity is not None else [None] * len(indices)
        for index, v, i, f in zip(indices, values.tolist(), best.tolist(), known):
            top = [(classes[j], p) for j, p in zip(i, v)]
            unknown = f is not None and threshold is not None and f < threshold
            results[index] = Prediction(str(files[index]), "unknown" if unknown else top[0][0], top[0][1], top,
                                        familiarity=f, unknown=unknown)
    return [results[index] for index in sorted(results)]
