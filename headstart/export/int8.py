"""The int8 copy of a checkpoint that predict, evaluate and serve run with precision "int8" (and
"auto" runs where it ran faster on a CPU without bf16): NNCF's post-training quantization written
as OpenVINO IR by `export`, made on first use and kept in the cache with its gate's result and its
speed. Which backend runs is decided in `classifier.load` alone; this module makes and finds."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from headstart.data import ImageDataset, Sample, make_loader
from headstart.export.writers import export
from headstart.io.download import atomic_write, cache_dir
from headstart.io.runfolder import run_splits
from headstart.models import LoadedModel, open_model
from headstart.runtime.device import resolve_runtime
from headstart.runtime.exported import ExportedModel, is_exported, open_exported
from headstart.version import __version__

log = logging.getLogger(__name__)


def int8_model(checkpoint: str | os.PathLike[str], *, images: Sequence[str | os.PathLike[str]] = (),
               arch: str | None = None, classes: str | list[str] | None = None,
               threads: int | None = None) -> ExportedModel:
    """`checkpoint` in int8, for predict, evaluate and serve with precision="int8": an int8 export
    as it is, else `export(..., precision="int8")` to OpenVINO IR, made on first use and kept under
    <cache_dir()>/int8/ (keyed by the checkpoint's bytes), with its gate's result and its speed
    against the checkpoint in headstart's default precision beside it (see `int8_if_faster`).
    Calibrated and checked on the run's images where its dataset is at hand, else on `images`."""
    src = Path(checkpoint)
    if is_exported(src):
        model = open_exported(src, threads=threads)
        if model.precision != "int8":
            raise ValueError(f"{src} is a {model.precision} export; precision int8 takes a checkpoint or an int8 "
                             "export (headstart export CKPT --format openvino --precision int8)")
        return model
    path, in_run = _int8_path(src, arch, classes)
    if path.is_file() and path.with_suffix(".json").is_file():  # the record is written last: a whole entry
        return open_exported(path, threads=threads)
    if not in_run and not images:
        raise FileNotFoundError(f"int8 needs images to calibrate and check on: {src} is not in a run folder whose "
                                "dataset is at hand; export it first: headstart export CKPT --format openvino "
                                "--precision int8 --images DIR, and use the .int8.xml it writes")
    path.with_suffix(".json").unlink(missing_ok=True)  # an entry without its record: made again, then recorded

    result = export(src, format="openvino", precision="int8", out=path, images=() if in_run else images,
                    arch=arch, classes=classes, overwrite=True)  # (the cache's own files)
    speed = _speeds(open_exported(path), open_model(src, arch=arch, classes=classes), result.checked_on)
    with atomic_write(path.with_suffix(".json"), "w") as f:
        json.dump({"parity": asdict(result.parity), **speed}, f, indent=1)
    log.info("int8 model of %s: %s; %.1f img/s against %.1f (%s)", src, result.parity.line(),
             speed["int8_img_s"], speed["default_img_s"], speed["default"])
    return open_exported(path, threads=threads)


def made_before(checkpoint: str | os.PathLike[str], *, arch: str | None = None,
                classes: str | list[str] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """(the int8 copy of `checkpoint` made before, its record: the gate's result and the speeds of
    int8 and the default precision), where there is a whole one in the cache; else None. Never made
    here (quantizing takes tens of seconds); whether to run it is `classifier.load`'s to decide."""
    src = Path(checkpoint)
    if is_exported(src) or not (cache_dir() / "int8").is_dir():  # (no hashing where none)
        return None
    try:
        path, _ = _int8_path(src, arch, classes, scan=False)
        record = json.loads(path.with_suffix(".json").read_text())
        record.update({k: float(record[k]) for k in ("int8_img_s", "default_img_s")})
    except Exception as e:  # noqa: BLE001  (no record, a damaged one: none)
        log.debug("no int8 copy of %s (%s: %s)", src, type(e).__name__, e)
        return None
    return (path, record) if path.is_file() else None


def open_copy(path: Path, *, threads: int | None = None) -> ExportedModel:
    """An int8 copy from the cache, opened (OpenVINO)."""
    return open_exported(path, threads=threads)


def _int8_path(src: Path, arch: str | None, classes: str | list[str] | None, *,
               scan: bool = True) -> tuple[Path, bool]:
    """Where int8_model keeps the int8 model of `src` (keyed by its bytes, arch, classes and
    headstart's version), and whether `src` is in a run whose dataset is at hand (with `scan`)."""
    h = hashlib.sha256(src.read_bytes() if src.is_file() else str(src).encode())
    h.update(json.dumps({"headstart": __version__, "arch": arch, "classes": classes}).encode())
    return cache_dir() / "int8" / f"{h.hexdigest()[:32]}.xml", scan and run_splits(src) is not None


def _speeds(int8: ExportedModel, loaded: LoadedModel, samples: Sequence[Sample]) -> dict[str, Any]:
    """img/s of the int8 model and of the checkpoint in headstart's default runtime (OpenVINO, bf16
    or fp32), on the same decoded images (decoding not counted), each after a warm-up batch."""
    loader = make_loader(ImageDataset(samples, int8.preprocessing.eval_transform()), batch_size=32, shuffle=False)
    batches = [b.images for b in loader if len(b)]
    runtime = resolve_runtime()
    net = runtime.inference_model(loaded.model)

    def rate(run: Callable[[torch.Tensor], object]) -> float:
        run(batches[0])
        start = time.perf_counter()
        for b in batches:
            run(b)
        return sum(map(len, batches)) / (time.perf_counter() - start)

    return {"int8_img_s": rate(lambda b: int8.run(b.permute(0, 2, 3, 1).contiguous().numpy())),
            "default_img_s": rate(lambda b: list(runtime.outputs(net, [(None, runtime.inputs(b, loaded.preprocessing))]))),
            "default": runtime.describe()}
