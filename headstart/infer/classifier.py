"""The trained model, opened once (opening.py), and the one way it runs: predict, evaluate, serve,
similar, export and the Python API all go through a `Classifier`:

    decode: decode.py (data.images.open_image, data.transforms.EvalTransform) -> uint8 (3, S, S)
    run:    a batch uint8 (N, 3, S, S) -> Runtime.inputs (float, normalised, channels_last) -> the
            network (or its backbone, then the head in fp32, where the unknown-image test runs) ->
            logits (N, C) float32 [and familiarity (N,)]
    answer: softmax(logits / temperature) -> top-k, "unknown" under the familiarity threshold
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn

from headstart.analysis.confidence import REFERENCE, Rejection, checkpoint_temperature, energy, nearest_similarity
from headstart.analysis.metrics import Metrics, compute_metrics
from headstart.data import Columns, Sample, evaluation_samples, make_loader
from headstart.infer.decode import (DecodedImages, ImageLike, check_top_k, decode_image, expand_images, image_name,
                                    is_single_image, refuse_failed)
from headstart.io.weights import weights_fingerprint
from headstart.models import LoadedModel, get_head, get_model_info
from headstart.runtime.device import Runtime
from headstart.runtime.exported import ExportedModel, is_exported
from headstart.runtime.features import Features, extract_features
from headstart.runtime.inference import INFERENCE_BATCH_SIZE

T = TypeVar("T")


@dataclass
class Prediction:
    path: str  # the file; for an image given in memory its file name where PIL knows it, else "image N"
    label: str | None  # None when the file could not be read as an image
    probability: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    familiarity: float | None = None  # share of validation images less familiar (None: no unknown-image test)
    unknown: bool = False  # familiarity under the threshold: `label` is "unknown", top_k still the classes'


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
        one = is_single_image(images) and not (isinstance(images, (str, os.PathLike)) and Path(images).is_dir())
        sources = expand_images(images)
        names = [image_name(s, i) for i, s in enumerate(sources)]
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
        sources = expand_images(images)
        out = self._run_many(sources, batch_size=batch_size, workers=workers)
        refuse_failed(sources, out.failed)
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
        sources = expand_images(images)
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
        from headstart.export.writers import export

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
        loader = make_loader(DecodedImages(sources, self.transform), batch_size=batch_size, shuffle=False, workers=workers)
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
