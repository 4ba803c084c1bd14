"""A trained model, opened once, and the one way it runs: predict, evaluate, serve, similar, export
and the Python API all go through a `Classifier`.

    m = headstart.load("runs/x/best.safetensors")
    m.predict(PIL.Image.open("photo.jpg"))  # Prediction(label, probability, top_k, familiarity, unknown)

`load` opens whatever names a trained model: a headstart checkpoint, a weights file with its head
(MindSpore .ckpt, .pth, safetensors, TF.js model.json: `arch`, `classes`), a file written by
`headstart export` (.onnx, OpenVINO .xml) or an int8 copy; and `load` (with `_open_export` and
`_int8_copy` beside it: the one place headstart decides how a trained model runs) chooses, once:

    an exported file              -> its own runtime (onnxruntime or OpenVINO), at its precision
    precision "int8"              -> the checkpoint's int8 copy (int8.py), run by OpenVINO; it
                                     computes no features, so it refuses a checkpoint's unknown-image
                                     test unless reject="off"
    precision "auto", a CPU without bf16, an int8 copy made before that ran faster, no unknown-image
    test wanted                   -> that int8 copy
    anything else                 -> the network through a Runtime (runtime.py): OpenVINO on an x86
                                     CPU where installed, for one image as for thousands (its converted
                                     graph is kept on disk), else PyTorch; bf16 where the CPU or GPU
                                     has it, else fp32

Training keeps its own choice for validation during fine-tuning (runtime.py's `inference_model`:
OpenVINO from `engine.MIN_IMAGES` images on, the weights changing every epoch); the frozen
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from .checkpoint import is_checkpoint, read_checkpoint
from .confidence import REFERENCE, Rejection, checkpoint_rejection, checkpoint_temperature, energy, nearest_similarity
from .data import IMAGE_ERRORS, Columns, Sample, collect_files, evaluation_samples, make_loader, open_image
from .exported import ExportedModel, is_exported, open_exported
from .features import Features, extract_features
from .inference import INFERENCE_BATCH_SIZE
from .metrics import Metrics, compute_metrics
from .models import LoadedModel, get_head, get_model_info, open_model
from .runtime import Runtime, resolve_runtime
from .weights import weights_fingerprint

# What `decode` takes: a path, an image's bytes, a PIL image, or an array uint8 (H, W), (H, W, 3) RGB
# or (H, W, 4) RGBA
ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str  # the file; for an image given in memory its file name where PIL knows it, else "image N"
    label: str | None  # None when the file could not be read as an image
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    familiarity: float | None = None  # share of validation images less familiar (None: no unknown-image test)
    unknown: bool = False  # familiarity under the threshold: `label` is "unknown", top_k still the classes'


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
    from . import int8
    from .runtime import cpu_has_bf16

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


class Classifier:
    """A trained model, opened by `load`: its class names, preprocessing, architecture, temperature
    and unknown-image test, and the backend that runs it (`backend`)."""

    def __init__(self, source: Path, *, loaded: LoadedModel | None = None, runtime: Runtime | None = None,
                 exported: ExportedModel | None = None, rejection: Rejection | None = None,
                 threshold: float | None = None, options: dict[str, Any] | None = None) -> None:
        self.source = source
        self._loaded, self._runtime, self._file = loaded, runtime, exported
        self._options = options or {}
        self._nets: dict[bool, nn.Module] = {}  # features? -> the inference copy, made on first use
        if exported is not None:
            self.classes, self.preprocessing = exported.classes, exported.preprocessing
            self.arch, self.temperature, self.precision = exported.arch, exported.temperature, exported.precision
            self.backend = f"{exported.path.suffix[1:]} file, {exported.precision} ({exported.runs_on})"
        else:
            assert loaded is not None and runtime is not None
            self.classes, self.preprocessing = loaded.classes, loaded.preprocessing
            self.arch, self.precision = loaded.meta.get("arch"), runtime.precision
            self.temperature = checkpoint_temperature(loaded.meta)
            self.backend = runtime.describe()
            self._head = get_head(loaded.model, get_model_info(loaded.meta["arch"]).classifier) \
                if rejection is not None else None
        self.rejection, self.threshold = rejection, threshold  # the unknown-image test, where it runs
        self.transform = self.preprocessing.eval_transform()

    @classmethod
    def _exported(cls, exported: ExportedModel, source: Path) -> "Classifier":
        return cls(source, exported=exported)

    def __repr__(self) -> str:
        return (f"Classifier({str(self.source)!r}, arch={self.arch!r}, classes={self.classes!r}, "
                f"backend={self.backend!r})")

    def describe(self) -> dict[str, Any]:
        """What serve's /model says: arch, classes, preprocessing, engine, temperature, threshold."""
        return {"arch": self.arch, "classes": self.classes, "preprocessing": self.preprocessing.to_dict(),
                "engine": self.backend, "temperature": self.temperature, "unknown_below": self.threshold}

    # -- one image, one batch ---------------------------------------------------------------------

    def decode(self, image: ImageLike) -> torch.Tensor:
        """An image -> uint8 (3, S, S), the model's input. Raises one of data.IMAGE_ERRORS for a file
        or bytes that are not a readable image (DecompressionBombError over Pillow's pixel guard)."""
        return decode_image(image, self.transform)

    def run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 (N, 3, S, S) -> (logits (N, C) float32, familiarity (N,) or None without the test)."""
        [(_, logits, familiarity)] = list(self._outputs([(None, images)]))
        return logits, familiarity

    def answers(self, logits: torch.Tensor, familiarity: torch.Tensor | None, *, top_k: int = 5,
                names: Sequence[str] = ()) -> list[Prediction]:
        """A Prediction per row of `logits`: top-k of softmax(logits / temperature), and with the test
        the familiarity, "unknown" under the threshold. `names`: each row's `path`."""
        k = min(check_top_k(top_k), len(self.classes))
        values, best = (logits.float() / self.temperature).softmax(1).topk(k, dim=1)
        known = familiarity.tolist() if familiarity is not None else [None] * len(logits)
        out = []
        for n, (v, i, f) in enumerate(zip(values.tolist(), best.tolist(), known)):
            top = [(self.classes[j], p) for j, p in zip(i, v)]
            unknown = f is not None and self.threshold is not None and f < self.threshold
            out.append(Prediction(names[n] if names else "", "unknown" if unknown else top[0][0], top[0][1], top,
                                  familiarity=f, unknown=unknown))
        return out

    def _outputs(self, batches: Iterable[tuple[T, torch.Tensor]]
                 ) -> Iterator[tuple[T, torch.Tensor, torch.Tensor | None]]:
        """(tag, logits, familiarity or None) for each (tag, uint8 batch), in order; OpenVINO keeps
        several batches in flight (Runtime.outputs)."""
        if self._file is not None:
            for tag, images in batches:
                yield tag, torch.from_numpy(self._file.run(images.permute(0, 2, 3, 1).contiguous().numpy())), None
            return
        runtime, features = self._runtime, self.rejection is not None
        inputs = ((tag, runtime.inputs(images, self.preprocessing)) for tag, images in batches)
        for tag, out in runtime.outputs(self._net(features), inputs):  # out: logits, or pooled features (N, F)
            if not features:
                yield tag, out.float(), None
                continue
            with torch.no_grad():
                logits = self._head(out.float()).float()
            yield tag, logits, self.rejection.familiarity(nearest_similarity(out, self._loaded.extra[REFERENCE]),
                                                          energy(logits, self.temperature))

    def prepare(self) -> "Classifier":
        """Make the inference copy now (OpenVINO's conversion or its graph read from disk), not on
        the first batch: serve calls it before it says it is serving."""
        if self._file is None:
            self._net(self.rejection is not None)
        return self

    def _net(self, features: bool) -> nn.Module:
        if features not in self._nets:
            self._nets[features] = self._runtime.inference_model(self._loaded.model, features=features)
        return self._nets[features]

    # -- many images ---------------------------------------------------------------------------------

    def predict(self, images: ImageLike | Sequence[ImageLike], *, top_k: int = 5,
                batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 2,
                on_batch: Callable[[int, int], None] | None = None) -> Prediction | list[Prediction]:
        """Class, probability and top-k at the model's temperature (with the unknown-image test, the
        familiarity and "unknown"). One image (a file, bytes, a PIL image, an array) -> a Prediction;
        a list of them, or a folder (its images, recursively) -> a list, in order; a file that is not
        a readable image gets an `error` instead. `workers`: processes decoding beside the model."""
        check_top_k(top_k)
        one = _single(images) and not (isinstance(images, (str, os.PathLike)) and Path(images).is_dir())
        sources = _expand(images)
        names = [_name(s, i) for i, s in enumerate(sources)]
        out = self._run_many(sources, batch_size=batch_size, workers=workers, on_batch=on_batch)
        results = {i: Prediction(names[i], None, 0.0, [], f"not a readable image ({reason})") for i, reason in out.failed}
        if out.indices:
            results.update(zip(out.indices, self.answers(out.logits, out.familiarity, top_k=top_k,
                                                         names=[names[i] for i in out.indices])))
        ordered = [results[i] for i in sorted(results)]
        return ordered[0] if one else ordered

    def logits(self, images: ImageLike | Sequence[ImageLike], *, batch_size: int = INFERENCE_BATCH_SIZE,
               workers: int = 0) -> torch.Tensor:
        """Logits (N, C) float32 of the images, in order (softmax(logits / temperature) are the
        probabilities). ValueError naming an image that cannot be read."""
        sources = _expand(images)
        out = self._run_many(sources, batch_size=batch_size, workers=workers)
        _refuse_failed(sources, out.failed)
        return out.logits

    def features(self, images: ImageLike | Sequence[ImageLike], *, cache: bool = False,
                 batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 0,
                 on_batch: Callable[[int, int], None] | None = None) -> Features:
        """Pooled backbone features (N, F) float32 of the decodable images (`indices`: their places in
        the list, `failed`: the others). `cache`: through the disk feature cache that training uses
        (keyed by the backbone's weights; files only). An exported file has none: ValueError."""
        if self._file is not None:
            raise ValueError(f"{self.source} runs as {self.backend}, which gives logits, not features: "
                             f"{'pass the checkpoint it came from' if is_exported(self.source) else 'load it with another precision'}")
        sources = _expand(images)
        if cache:  # through the disk cache, keyed by the files and the backbone's weights
            if not all(isinstance(s, (str, os.PathLike)) for s in sources):
                raise ValueError("the feature cache keys images by their files: pass paths, or cache=False")
            model = self._loaded.model
            return extract_features(model, [Sample(Path(s), -1) for s in sources], runtime=self._runtime,
                                    pre=self.preprocessing, batch_size=batch_size, workers=workers,
                                    cache_key=weights_fingerprint(model, exclude=f"{get_model_info(self.arch).classifier}."),
                                    backbone=lambda: self._net(True), on_batch=on_batch)
        failed: list[tuple[int, str]] = []
        runtime = self._runtime
        inputs = ((t, runtime.inputs(x, self.preprocessing))
                  for t, x in self._batches(sources, batch_size=batch_size, workers=workers, failed=failed,
                                            on_batch=on_batch))
        parts = list(runtime.outputs(self._net(True), inputs))
        if not parts:
            return Features(torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long),
                            failed)
        index = torch.cat([t for t, _ in parts])
        return Features(torch.cat([x.float() for _, x in parts]), torch.full((len(index),), -1, dtype=torch.long),
                        index, failed)

    def evaluate(self, data: str | os.PathLike[str], *, columns: Columns | None = None,
                 batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 2) -> Metrics:
        """Metrics on a labelled dataset: a class-per-folder folder (its `val/` folder where it has
        one), or a table of labels (its val rows where it has a split column; `columns`). Classes are
        matched to the model's by name (one it does not know is an error); the loss and calibration
        error are of the probabilities at its temperature."""
        present, found = evaluation_samples(data, columns=columns)
        return self.evaluate_samples(present, found, where=str(data), batch_size=batch_size, workers=workers)

    def evaluate_samples(self, present: list[str], found: Sequence[Sample], *, where: str,
                         batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 2) -> Metrics:
        """`evaluate` of samples already found (data.evaluation_samples: `present` names their labels)."""
        unknown = sorted(set(present) - set(self.classes))
        if unknown:
            raise ValueError(f"class(es) {unknown} in {where} are not classes of the model {self.classes}")
        samples = [Sample(s.path, self.classes.index(present[s.label])) for s in found]
        out = self._run_many([s.path for s in samples], batch_size=batch_size, workers=workers)
        labels = torch.tensor([samples[i].label for i in out.indices], dtype=torch.long)
        metrics = compute_metrics(out.logits / self.temperature, labels, self.classes)
        metrics.skipped = [str(samples[i].path) for i, _ in out.failed]
        return metrics

    def export(self, out: str | os.PathLike[str] | None = None, **options: Any):
        """`export.export` of this model's checkpoint (format, images, precision, calibration,
        overwrite): ONNX or OpenVINO IR, checked by the parity gate."""
        from .export import export

        if is_exported(self.source):
            raise ValueError(f"{self.source} is an exported file already; export the checkpoint it came from")
        return export(self.source, out=out, **{**self._options, **options})

    def _run_many(self, sources: Sequence[ImageLike], *, batch_size: int, workers: int,
                  on_batch: Callable[[int, int], None] | None = None) -> "_Outputs":
        """Decode `sources` (`workers` processes beside the model) and run them in batches."""
        failed: list[tuple[int, str]] = []
        batches = self._batches(sources, batch_size=batch_size, workers=workers, failed=failed, on_batch=on_batch)
        parts = list(self._outputs(batches))
        if not parts:
            return _Outputs(torch.empty(0, len(self.classes)), None, [], failed)
        familiarity = torch.cat([f for _, _, f in parts]) if parts[0][2] is not None else None
        return _Outputs(torch.cat([x for _, x, _ in parts]), familiarity,
                        torch.cat([t for t, _, _ in parts]).tolist(), failed)

    def _batches(self, sources: Sequence[ImageLike], *, batch_size: int, workers: int,
                 failed: list[tuple[int, str]], on_batch: Callable[[int, int], None] | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(places in `sources`, uint8 (N, 3, S, S)) batches, decoded by `decode` in `workers`
        processes; the undecodable go to `failed`; `on_batch(step, steps)` after each."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        loader = make_loader(_Decoded(sources, self.transform), batch_size=batch_size, shuffle=False, workers=workers)
        for step, batch in enumerate(loader):
            failed.extend(batch.failed)
            if len(batch):
                yield batch.indices, batch.images
            if on_batch:
                on_batch(step + 1, len(loader))


@dataclass
class _Outputs:
    logits: torch.Tensor  # float32 (N, C), for the images that decoded
    familiarity: torch.Tensor | None  # (N,) where the unknown-image test runs
    indices: list[int]  # their places in the list of sources
    failed: list[tuple[int, str]]  # (place, reason) of the others


def decode_image(image: ImageLike, transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """`Classifier.decode`, for the loader's workers too (they get the transform, not the model)."""
    if isinstance(image, Image.Image):
        return transform(image)
    if isinstance(image, np.ndarray):
        return transform(_from_array(image))
    if not isinstance(image, (str, os.PathLike, bytes, bytearray)):
        raise TypeError(f"an image is a path, bytes, a PIL image or a uint8 array, not {type(image).__name__}")
    with open_image(image) as img:
        return transform(img)


class _Decoded(torch.utils.data.Dataset):
    """Sources -> (uint8 image or None, -1, index, reason), for data.collate; (index, epoch) keys."""

    def __init__(self, sources: Sequence[ImageLike], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.sources, self.transform = list(sources), transform

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int, int, str]:
        index = key[0]
        try:
            return decode_image(self.sources[index], self.transform), -1, index, ""
        except IMAGE_ERRORS as e:
            return None, -1, index, f"{type(e).__name__}: {e}"


def _from_array(a: np.ndarray) -> Image.Image:
    """A uint8 array (H, W), (H, W, 3) RGB or (H, W, 4) RGBA as a PIL image."""
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ValueError(f"an image array must be uint8 (H, W), (H, W, 3) RGB or (H, W, 4) RGBA; got {a.dtype} "
                         f"{tuple(a.shape)} (np.asarray(PIL.Image.open(f).convert('RGB')) gives one)")
    return Image.fromarray(np.ascontiguousarray(a))


def _single(images: Any) -> bool:
    """One image (a path, bytes, a PIL image, an array), not a list or another iterable of them."""
    return isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)) or \
        not isinstance(images, Iterable)


def _expand(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image or several, as a list: paths as collect_files gives them (a folder: its images;
    FileNotFoundError for none), the rest as given."""
    out: list[ImageLike] = []
    for s in [images] if _single(images) else images:
        out += collect_files([s]) if isinstance(s, (str, os.PathLike)) else [s]
    return out


def _name(source: ImageLike, i: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "filename", "") or f"image {i}"


def check_top_k(k: int) -> int:
    """`k` where it is a number of classes to list (1 or more); ValueError naming it otherwise."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    return k


def _refuse_failed(sources: Sequence[ImageLike], failed: list[tuple[int, str]]) -> None:
    if failed:
        i, reason = failed[0]
        raise ValueError(f"{_name(sources[i], i)} is not a readable image ({reason})"
                         f"{f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''}")


__all__ = ["Classifier", "ImageLike", "Prediction", "check_top_k", "load"]
