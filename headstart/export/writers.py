"""Export a model with its preprocessing, for use without headstart: ONNX (onnxruntime, or anything
that reads ONNX) or OpenVINO IR; every export is checked against headstart's own inference on real
images (the parity gate) and removed again if they disagree.

What the exported graph takes and gives (batch size free):

    images: uint8 (N, S, S, 3), RGB, each image resized so that its shorter side is `resize_size`
            (bilinear or bicubic, as `interpolation` says) and centre-cropped to S x S: the caller's part
    inside: float, / 255, minus mean, over std (the checkpoint's), the network, softmax
    logits: float32 (N, C); probabilities: float32 (N, C), in the order of `classes`

The metadata (ONNX metadata_props, OpenVINO rt_info) holds, under "headstart", a JSON document:
classes, preprocessing, architecture, the source checkpoint and headstart's version.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from headstart.analysis.confidence import checkpoint_temperature
from headstart.data import DatasetSplits, ImageDataset, Sample, collect_files, make_loader, spread
from headstart.data.transforms import Preprocessing
from headstart.export.gate import Parity, check_parity, parity_images
from headstart.io import outputs
from headstart.io.runfolder import run_splits
from headstart.models import open_model
from headstart.runtime.device import resolve_runtime
from headstart.runtime.exported import SUFFIXES, open_exported
from headstart.runtime.features import CALIBRATION_IMAGES
from headstart.version import __version__

log = logging.getLogger(__name__)


FORMATS = ("onnx", "openvino")


PRECISIONS = ("fp32", "int8")  # int8: OpenVINO IR only, quantized by NNCF


class _WithPreprocessing(nn.Module):
    """uint8 (N, S, S, 3) -> (logits, probabilities), normalisation inside."""

    def __init__(self, model: nn.Module, pre: Preprocessing, temperature: float = 1.0) -> None:
        super().__init__()
        self.model, self.temperature = model, temperature  # probabilities at the checkpoint's temperature
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        logits = self.model(x)
        return logits, F.softmax(logits / self.temperature, dim=1)


@dataclass
class Exported:
    path: Path
    format: str
    classes: list[str]
    parity: Parity
    files: list[Path] = field(default_factory=list)
    checked_on: list[Sample] = field(default_factory=list)  # the images the gate ran on


def export(checkpoint: str | os.PathLike[str], *, format: str | None = None,
           out: str | os.PathLike[str] | None = None, images: Sequence[str | os.PathLike[str]] = (),
           precision: str = "fp32", calibration: Sequence[str | os.PathLike[str]] = (), arch: str | None = None,
           classes: str | list[str] | None = None, overwrite: bool = False) -> Exported:
    """Write `checkpoint` (anything open_model takes) as ONNX or OpenVINO IR with its preprocessing,
    then check it on real images: `images` (files or folders), else the validation images of the run
    the checkpoint comes from. ParityError if the exported model's logits differ from headstart's by
    more than LOGIT_TOLERANCE or a top-1 class differs; `out` is then left as it was.

    `format`: "onnx" or "openvino"; default: from `out`'s suffix (.onnx, .xml), else onnx. `out`
    (default: beside the checkpoint) is written only once the gate passed (outputs.staged), and
    only over an export of the same format (else FileExistsError, unless `overwrite`).

    precision="int8" (OpenVINO only): weights and activations quantized by NNCF, the ranges set on
    `calibration` images (else up to CALIBRATION_IMAGES of the run's training images, else `images`);
    the gate then allows the validation accuracy to fall by INT8_MAX_DROP at most."""
    format = _format(format, out, precision)
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and format != "openvino":
        raise ValueError("int8 is written as OpenVINO IR: add --format openvino (or --out FILE.xml)")
    src = Path(checkpoint)
    suffix = ".onnx" if format == "onnx" else ".int8.xml" if precision == "int8" else ".xml"
    out = Path(out) if out else src.with_suffix(suffix)
    kind = outputs.ONNX_EXPORT if format == "onnx" else outputs.OPENVINO_EXPORT
    outputs.claim(out, kind, overwrite=overwrite)  # before any work: a file of the user's is never touched
    loaded = open_model(checkpoint, arch=arch, classes=classes)
    temperature = checkpoint_temperature(loaded.meta)
    splits = None if images else run_splits(src)  # (scanned once: the gate's images and int8's calibration)
    samples, where = parity_images(src, images, splits)
    metadata = json.dumps({"classes": loaded.classes, "preprocessing": loaded.preprocessing.to_dict(),
                           "arch": loaded.meta.get("arch"), "arch_kwargs": loaded.meta.get("arch_kwargs", {}),
                           "precision": precision, "source": str(src), "headstart": __version__,
                           "temperature": temperature})
    # The reference: headstart's inference copy (conv and BatchNorm folded) in fp32, which is also
    # what is exported.
    runtime = resolve_runtime(precision="fp32", engine="torch")
    net = _WithPreprocessing(runtime.inference_model(loaded.model, images=1).float(), loaded.preprocessing,
                             temperature).eval()
    size = loaded.preprocessing.image_size
    example = torch.zeros(1, size, size, 3, dtype=torch.uint8)
    with outputs.staged(out, kind, overwrite=overwrite) as tmp:  # renamed to `out` once the gate passed
        if format == "onnx":
            _write_onnx(net, example, tmp, metadata)
        else:
            inputs = _calibration_inputs(src, calibration or images, splits, loaded.preprocessing) \
                if precision == "int8" else None
            _write_openvino(net, example, tmp, metadata, calibration=inputs)
        parity = check_parity(open_exported(tmp), net, samples, loaded.preprocessing, where, precision=precision,
                              out=out)
    log.info("exported %s -> %s; %s", src, out, parity.line())
    return Exported(out, format, loaded.classes, parity, kind.files(out), samples)


def _format(format: str | None, out: str | os.PathLike[str] | None, precision: str) -> str:
    """The export's format: `format`, else `out`'s suffix's, else onnx (openvino for int8); a
    suffix that is not the format's is refused before anything is written."""
    if format is not None and format not in FORMATS:
        raise ValueError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    if out is None:
        return format or ("openvino" if precision == "int8" else "onnx")
    by_suffix = SUFFIXES.get(Path(out).suffix.lower())
    if by_suffix is None or (format is not None and by_suffix != format):
        want = {v: k for k, v in SUFFIXES.items()}
        fix = f"end it in {want[format]}" if format else "end it in .onnx (ONNX) or .xml (OpenVINO IR)"
        raise ValueError(f"--out {out}: an export is written as {format or 'ONNX or OpenVINO IR'}; {fix}")
    return by_suffix


def _write_onnx(net: nn.Module, example: torch.Tensor, out: Path, metadata: str) -> None:
    import io

    import onnx

    buf = io.BytesIO()
    # TorchScript's exporter (torch's older one): it traces through the network as OpenVINO's
    # conversion does (TF-style padding as F.pad, the fused BatchNorm kernel not used in eval), and
    # needs neither torch.export nor onnxscript.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(net, (example,), buf, input_names=["images"], output_names=["logits", "probabilities"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=17, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    proto.metadata_props.add(key="headstart", value=metadata)
    onnx.checker.check_model(proto)
    out.write_bytes(proto.SerializeToString())


def _write_openvino(net: nn.Module, example: torch.Tensor, out: Path, metadata: str, *,
                    calibration: list[np.ndarray] | None = None) -> None:
    from headstart.runtime.openvino import convert_to_openvino, import_openvino, quantize_int8

    ov = import_openvino()[0]
    graph = convert_to_openvino(net, example)
    if calibration is not None:
        start = time.perf_counter()
        graph = quantize_int8(graph, calibration)
        log.info("quantized to int8 on %d images in %.1fs", len(calibration), time.perf_counter() - start)
    graph.outputs[0].get_tensor().set_names({"logits"})
    graph.outputs[1].get_tensor().set_names({"probabilities"})
    graph.inputs[0].get_tensor().set_names({"images"})
    graph.set_rt_info(metadata, ["headstart", "metadata"])
    ov.save_model(graph, str(out), compress_to_fp16=False)  # fp32 weights, as given; out.bin beside it


def _calibration_inputs(checkpoint: Path, images: Iterable[str | os.PathLike[str]], splits: DatasetSplits | None,
                        pre: Preprocessing) -> list[np.ndarray]:
    """int8's calibration inputs, uint8 (1, S, S, 3) each: up to CALIBRATION_IMAGES of `images` (files
    or folders), else of the training images of the checkpoint's run (`splits`), spread over its classes."""
    if images:
        samples = [Sample(f, -1) for f in collect_files(images)]
    elif splits is not None:
        samples = splits.train
    else:
        raise FileNotFoundError(f"no images to calibrate int8 on: {checkpoint} is not in a run folder whose "
                                "dataset is at hand; pass some with --calibration DIR")
    loader = make_loader(ImageDataset(spread(samples, CALIBRATION_IMAGES), pre.eval_transform()), batch_size=32,
                         shuffle=False)
    return [image.permute(1, 2, 0).unsqueeze(0).contiguous().numpy() for b in loader for image in b.images]
