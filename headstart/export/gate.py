"""The parity gate: every export is run, as a user's code would run it (`documented_crop`: the
lines docs/export.md gives, Pillow and numpy, written apart from headstart's own decoder), on real
images (the run's validation images, or those given), and compared with headstart's own inference:
the largest logit difference and the top-1 agreement; an export that disagrees is removed again
(`ParityError`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from headstart.data import IMAGE_ERRORS, DatasetSplits, ImageDataset, Sample, collect_files, make_loader, spread
from headstart.data.transforms import _INTERPOLATIONS as _RESAMPLING
from headstart.data.transforms import Preprocessing
from headstart.runtime.exported import ExportedModel

LOGIT_TOLERANCE = 1e-3  # max |exported - headstart| logit, fp32 both; measured: about 1e-5 (see docs/export.md)


INT8_MAX_DROP = 0.005  # int8: the most validation accuracy may fall against fp32 (0.5 points); on


#                        images without labels, the most top-1 classes may change (0.5%)
PARITY_IMAGES = 256  # at most this many images checked


@dataclass
class Parity:
    images: int
    max_logit_diff: float
    top1_agreement: float  # fraction of images whose top-1 class is the same
    source: str  # where the images came from
    precision: str = "fp32"
    accuracy: float | None = None  # the exported model's, where the images have labels
    reference_accuracy: float | None = None  # headstart's fp32 model's on the same images

    def line(self) -> str:
        text = f"parity on {self.images} images ({self.source}): max |logit difference| {self.max_logit_diff:.2e}"
        if self.precision == "fp32":
            text += f" (tolerance {LOGIT_TOLERANCE:g})"
        text += f", top-1 agreement {self.top1_agreement:.2%}"
        if self.accuracy is not None and self.reference_accuracy is not None:
            change = 100 * (self.accuracy - self.reference_accuracy)
            text += (f"; accuracy {self.accuracy:.4f} against {self.reference_accuracy:.4f} in fp32 "
                     f"({change:+.2f} points")
            text += f", at most -{100 * INT8_MAX_DROP:g} allowed)" if self.precision == "int8" else ")"
        elif self.precision == "int8":
            text += f" (at least {1 - INT8_MAX_DROP:.1%} needed)"
        return text


class ParityError(ValueError):
    """The exported model does not give headstart's answers."""


def documented_crop(path: str | os.PathLike[str], pre: Preprocessing) -> np.ndarray:
    """An image as docs/export.md's snippet makes it for an exported file, uint8 (S, S, 3): Pillow's
    decode at full size, EXIF rotation, transparency on white, RGB, the shorter side resized to
    `resize_size`, the centre S x S cut out (a 16-bit or float image scaled to 8 bits first, as the
    docs/export.md says). Written apart from headstart's decoder (preprocessing.EvalTransform) on purpose:
    the gate then checks the file as a user's code runs it."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):  # docs/export.md's note: to 8 bits first
            a = np.asarray(img, dtype=np.float64)
            a = (a * 255 if a.size and a.max() <= 1 else a) if img.mode == "F" else a / 257
            img = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img).convert("RGB")
    s, scale = pre.image_size, pre.resize_size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), _RESAMPLING[pre.interpolation])
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return np.asarray(img.crop((left, top, left + s, top + s)))


def run_as_documented(model: ExportedModel, samples: Sequence[Sample], *, batch_size: int = 32
                      ) -> tuple[np.ndarray, list[int], list[tuple[int, str]]]:
    """(logits (N, C), their sample indices, failed (index, reason)) of an exported file fed with
    `documented_crop`s."""
    logits, indices, failed, batch = [], [], [], []

    def flush() -> None:
        if batch:
            logits.append(model.run(np.stack([crop for _, crop in batch])))
            indices.extend(i for i, _ in batch)
            batch.clear()

    for i, s in enumerate(samples):
        try:
            batch.append((i, documented_crop(s.path, model.preprocessing)))
        except IMAGE_ERRORS as e:
            failed.append((i, f"{type(e).__name__}: {e}"))
        if len(batch) == batch_size:
            flush()
    flush()
    return (np.concatenate(logits) if logits else np.zeros((0, len(model.classes)), np.float32)), indices, failed


def check_parity(exported: ExportedModel, reference: nn.Module, samples: Sequence[Sample], pre: Preprocessing,
                 source: str, *, precision: str = "fp32", out: Path | None = None) -> Parity:
    """The exported model, run as docs/export.md's snippet runs it (`run_as_documented`), against
    `reference` (the same network in PyTorch, fp32, uint8 NHWC in) fed by headstart's own decoder,
    on `samples`; ParityError beyond the tolerance of `precision` (see LOGIT_TOLERANCE, INT8_MAX_DROP),
    or where no image could be decoded. `out`: where the export goes, for the message."""
    logits, indices, failed = run_as_documented(exported, samples)
    if not indices:
        first = f" (e.g. {samples[failed[0][0]].path}: {failed[0][1]})" if failed else ""
        raise ParityError(f"none of the {len(samples)} image(s) to check the export on ({source}) could be read as an "
                          f"image{first}; pass image files or folders with --images")
    loader = make_loader(ImageDataset([samples[i] for i in indices], pre.eval_transform()), batch_size=32,
                         shuffle=False)
    with torch.no_grad():
        ref = torch.cat([reference(b.images.permute(0, 2, 3, 1).contiguous())[0] for b in loader]).numpy()
    labels = np.array([samples[i].label for i in indices])
    labelled = bool((labels >= 0).all())
    parity = Parity(len(ref), float(np.abs(ref - logits).max()), float((ref.argmax(1) == logits.argmax(1)).mean()),
                    source, precision, float((logits.argmax(1) == labels).mean()) if labelled else None,
                    float((ref.argmax(1) == labels).mean()) if labelled else None)
    if precision == "int8":
        fails = (parity.reference_accuracy - parity.accuracy > INT8_MAX_DROP + 1e-9 if labelled
                 else 1 - parity.top1_agreement > INT8_MAX_DROP + 1e-9)
        hint = "; int8 does not suit this model: keep fp32 or bf16 (drop --precision int8)"
    else:
        fails = parity.max_logit_diff > LOGIT_TOLERANCE or parity.top1_agreement < 1.0
        hint = ""
    if fails:
        raise ParityError(f"the export disagrees with headstart: {parity.line()}; nothing was written"
                          f"{f' ({out} is as it was)' if out is not None and out.exists() else ''}{hint}")
    return parity


def parity_images(checkpoint: Path, images: Iterable[str | os.PathLike[str]],
                   splits: DatasetSplits | None) -> tuple[list[Sample], str]:
    """The images to check on: those given, else the validation images of the checkpoint's run (`splits`)."""
    if images:
        return spread([Sample(f, -1) for f in collect_files(images)], PARITY_IMAGES), "the images given"
    if splits is not None:
        return spread(splits.val, PARITY_IMAGES), f"the run's validation images, {splits.root}"
    raise FileNotFoundError(f"no images to check the export on: {checkpoint} is not in a run folder whose dataset is "
                            "at hand; pass some with --images DIR")
