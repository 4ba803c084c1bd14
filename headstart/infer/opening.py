"""A trained model, opened once, and the one way it runs: predict, evaluate, serve, similar, export
and the Python API all go through a `Classifier`.

    m = headstart.load("runs/x/best.safetensors")
    m.predict(PIL.Image.open("photo.jpg"))  # Prediction(label, probability, top_k, familiarity, unknown)

`load` opens whatever names a trained model: a headstart checkpoint, a weights file with its head
(MindSpore .ckpt, .pth, safetensors, TF.js model.json: `arch`, `classes`), a file written by
`headstart export` (.onnx, OpenVINO .xml) or an int8 copy; and `load` (with `_open_export` and
`_int8_copy` beside it: the one place headstart decides how a trained model runs) chooses, once:

    an exported file              -> its own runtime (onnxruntime or OpenVINO), at its precision
    precision "int8"              -> the checkpoint's int8 copy (export/int8.py), run by OpenVINO; it
                                     computes no features, so it refuses a checkpoint's unknown-image
                                     test unless reject="off"
    precision "auto", a CPU without bf16, an int8 copy made before that ran faster, no unknown-image
    test wanted                   -> that int8 copy
    anything else                 -> the network through a Runtime (runtime/device.py): OpenVINO on an x86
                                     CPU where installed, for one image as for thousands (its converted
                                     graph is kept on disk), else PyTorch; bf16 where the CPU or GPU
                                     has it, else fp32

Training keeps its own choice for validation during fine-tuning (runtime/device.py's `inference_model`:
OpenVINO from `runtime.openvino.MIN_IMAGES` images on, the weights changing every epoch); the frozen
strategy's features and the unknown-image test's fit run as a trained model does
(`Runtime.for_trained_model`), so the head learns on the numbers predict gives.

One image, whichever way it comes in (a path, bytes, a PIL image, an array):

    decode: data.open_image (header, pixel guard) -> preprocessing.EvalTransform (full decode, EXIF
            rotation, any mode to RGB, shorter side to resize_size, centre S x S) -> uint8 (3, S, S)
    run:    a batch uint8 (N, 3, S, S) -> Runtime.inputs (float, normalised, channels_last) -> the
            network (or its backbone, then the head in fp32, where the unknown-image test runs) ->
            logits (N, C) float32 [and familiarity (N,)]
    answer: softmax(logits / temperature) -> top-k, "unknown" under the familiarity threshold
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

from headstart.analysis.confidence import checkpoint_rejection
from headstart.infer.classifier import Classifier
from headstart.io.checkpoint import is_checkpoint, read_checkpoint
from headstart.models import open_model
from headstart.runtime.device import resolve_runtime
from headstart.runtime.exported import ExportedModel, is_exported, open_exported

log = logging.getLogger(__name__)


def load(model: str | os.PathLike[str], *, precision: str = "auto", engine: str = "auto", device: str = "auto",
         threads: int | None = None, compile: bool = False, reject: str | float = "auto", arch: str | None = None,
         classes: str | list[str] | None = None, default_classes: list[str] | None = None,
         calibration: Sequence[str | os.PathLike[str]] = (), features: bool = False) -> "Classifier":
    """Open a trained model once, with the backend that will run it (see the module docstring).

    `model`: a run's best.safetensors, a weights file with its head (`arch`, `classes` as in
    `models.open_model`; `default_classes` when `classes` is not given), an exported .onnx/.xml.
    `precision`: auto, fp32, bf16, fp16 or int8; `engine`: auto, torch or openvino; `device`: auto,
    cpu, cuda, cuda:N; `threads`: torch's CPU threads. `reject`: "auto" calls an image `unknown`
    below the checkpoint's familiarity threshold (about 5% of its validation images), a number in
    (0, 1) is such a threshold, "off" never does. `calibration`: images to make an int8 copy on
    where the checkpoint is not in a run folder whose dataset is at hand. `features=True`: the
    caller needs backbone features (`Classifier.features`: similar), which a network gives and an
    exported file or int8 copy does not."""
    threshold = _threshold(reject)
    source = Path(model)
    if is_exported(source):
        if features:
            raise ValueError(f"{source} is an exported file: it gives logits, not the backbone features this needs; "
                             "pass the checkpoint it came from")
        return Classifier._exported(_open_export(source, precision=precision, engine=engine, device=device,
                                                 compile=compile, threshold=threshold, threads=threads), source)
    tests = is_checkpoint(source) and "unknown" in read_checkpoint(source, tensors=False)[1]
    if threshold is not None and not tests:
        raise ValueError(f"--reject {reject} needs a checkpoint with an unknown-image test; {model} has none "
                         "(a run's best.safetensors written by this headstart's `train` has one). Use --reject off")
    wanted = tests and reject != "off"  # the unknown-image test: features from the network in PyTorch
    if features and precision == "int8":
        raise ValueError("precision int8 runs an int8 copy that gives logits, not the backbone features this needs: "
                         "drop --precision int8")
    copy = _int8_copy(source, precision=precision, engine=engine, device=device, compile=compile, threads=threads,
                      wanted=wanted or features, arch=arch, classes=classes, calibration=calibration)
    if copy is not None:
        return Classifier._exported(copy, source)
    loaded = open_model(model, arch=arch, classes=classes, default_classes=default_classes)  # (a tag, a URL too)
    rejection = checkpoint_rejection(loaded.meta, loaded.extra) if reject != "off" else None
    runtime = resolve_runtime(device=device, precision=precision, threads=threads, compile=compile, engine=engine)
    return Classifier(source, loaded=loaded, runtime=runtime.for_trained_model(), rejection=rejection,
                      threshold=threshold if threshold is not None else rejection.threshold if rejection else None,
                      options={"arch": arch, "classes": classes})


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


def _open_export(path: Path, *, precision: str, engine: str, device: str, compile: bool,
                 threshold: float | None, threads: int | None) -> ExportedModel:
    """An exported file, where the options asked for can be honoured: it runs on its own runtime,
    on the CPU (`threads`), at the precision it was written in, without an unknown-image test."""
    exported = open_exported(path, threads=threads)
    if precision not in ("auto", exported.precision):
        raise ValueError(f"{path} is an {exported.precision} export and runs in {exported.precision}, not "
                         f"{precision}: drop --precision, or pass the checkpoint it came from")
    if engine != "auto" or device not in ("auto", "cpu") or compile:
        raise ValueError(f"{path} runs on {exported.runs_on} on the CPU: drop --engine, --device and --compile (they "
                         "choose how a checkpoint runs), or pass the checkpoint it came from")
    if threshold is not None:
        raise ValueError(f"--reject {threshold} needs a checkpoint with an unknown-image test; an exported file has "
                         "none. Use --reject off, or pass the checkpoint")
    return exported


def _int8_copy(source: Path, *, precision: str, engine: str, device: str, compile: bool, threads: int | None,
               wanted: bool, arch: str | None, classes: str | list[str] | None,
               calibration: Sequence[str | os.PathLike[str]]) -> ExportedModel | None:
    """The checkpoint's int8 copy (OpenVINO, on the CPU) where it is asked for (precision "int8"),
    or, with precision "auto", one made before where the CPU has no native bf16, nothing asked for
    another engine or device, no features are wanted, and it passed its gate and ran faster than
    the default precision (its record says); None: the network runs through a Runtime."""
    from headstart.export import int8
    from headstart.runtime.device import cpu_has_bf16

    if precision == "int8":
        if engine == "torch" or device not in ("auto", "cpu") or compile:
            raise ValueError("precision int8 runs an int8 copy in OpenVINO on the CPU: drop --engine torch, --device "
                             "and --compile, or choose another --precision")
        if wanted:
            raise ValueError(f"precision int8 computes no features, so it cannot run the unknown-image test of "
                             f"{source}: every image, a photo of something else too, would get one of its classes. "
                             "Pass --reject off to predict in int8 without the test, or drop --precision int8 to "
                             "keep it (bf16 or fp32)")
        return int8.int8_model(source, images=calibration, arch=arch, classes=classes, threads=threads)
    if precision != "auto" or engine == "torch" or device not in ("auto", "cpu") or compile or wanted or \
            cpu_has_bf16():
        return None
    found = int8.made_before(source, arch=arch, classes=classes)
    if found is None or not found[1]["int8_img_s"] > found[1]["default_img_s"]:
        return None
    log.info("precision auto: the int8 copy (%.1f img/s against %.1f in %s)", found[1]["int8_img_s"],
             found[1]["default_img_s"], found[1]["default"])
    return int8.open_copy(found[0], threads=threads)
