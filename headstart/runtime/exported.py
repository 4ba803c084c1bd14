"""Running a file written by `headstart export` (.onnx by onnxruntime, OpenVINO .xml by OpenVINO):
one of the Classifier's backends (infer/classifier.py). What such a file takes and holds is in export/writers.py's
docstring: uint8 (N, S, S, 3) centre crops in, logits and probabilities out, and under "headstart"
in its metadata the classes, preprocessing, architecture, precision and temperature."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from headstart.data.transforms import Preprocessing

SUFFIXES = {".onnx": "onnx", ".xml": "openvino"}


@dataclass
class ExportedModel:
    """An exported file, run by onnxruntime (.onnx) or OpenVINO (.xml): uint8 (N, S, S, 3) -> logits."""

    path: Path
    classes: list[str]
    preprocessing: Preprocessing
    run: Callable[[np.ndarray], np.ndarray]
    precision: str = "fp32"  # of its weights and activations: fp32 or int8
    temperature: float = 1.0  # the checkpoint's: probabilities are softmax(logits / temperature)
    arch: str | None = None  # the architecture of the network it was exported from

    @property
    def runs_on(self) -> str:
        return "onnxruntime" if SUFFIXES[self.path.suffix.lower()] == "onnx" else "OpenVINO"


def is_exported(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in SUFFIXES


def open_exported(path: str | os.PathLike[str], *, threads: int | None = None) -> ExportedModel:
    """An exported .onnx or .xml with what its metadata says (classes, preprocessing, arch), run on
    `threads` CPU threads (None: the runtime's default, one per core)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model not found: {path}; write one with `headstart export CKPT`")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind == "onnx":
        import onnx
        import onnxruntime as ort

        props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run(["logits"], {"images": batch})[0]

        raw = props.get("headstart")
    elif kind == "openvino":
        from headstart.runtime.openvino import import_openvino, openvino_core

        import_openvino()
        graph = openvino_core().read_model(str(path))
        raw = graph.get_rt_info(["headstart", "metadata"]).astype(str) if graph.has_rt_info(["headstart", "metadata"]) \
            else None
        compiled = openvino_core().compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                        **({"INFERENCE_NUM_THREADS": threads} if threads else {})})
        request = compiled.create_infer_request()

        def run(batch: np.ndarray) -> np.ndarray:
            return request.infer({0: batch})[compiled.outputs[0]].copy()
    else:
        raise ValueError(f"{path}: an exported model is a .onnx or an OpenVINO .xml (with its .bin)")
    if raw is None:
        raise ValueError(f"{path} has no 'headstart' metadata: it was not written by `headstart export`")
    meta = json.loads(raw)
    return ExportedModel(path, list(meta["classes"]), Preprocessing.from_dict(meta["preprocessing"]), run,
                         meta.get("precision", "fp32"), float(meta.get("temperature", 1.0)), meta.get("arch"))
