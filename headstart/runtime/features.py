"""Backbone features computed once, for the frozen strategy.

A frozen backbone is a fixed function of the image, so it runs once per image (and view), and the
head trains on the pooled features: ten epochs cost one backbone pass instead of ten. For ResNet50
that pass is about 8.2 GFLOP per 224x224 image; the head's epochs cost next to nothing.

Views: view 0 is the eval transform; views 1..K are augmented (train transform, seeded per sample
and view). On disk, features are keyed by the backbone's weights, the preprocessing, the view and
the content of every file, so a second run with another head or learning rate reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from headstart.data import ImageDataset, Sample, make_loader, spread
from headstart.data.transforms import Preprocessing
from headstart.io.download import cache_dir
from headstart.io.formats.safetensors import read_safetensors, write_safetensors
from headstart.runtime.device import Runtime
from headstart.runtime.inference import INFERENCE_BATCH_SIZE, run_inference

log = logging.getLogger(__name__)


@dataclass
class Features:
    features: torch.Tensor  # float32 (N, F), one row per decodable image
    labels: torch.Tensor  # int64 (N,)
    indices: torch.Tensor  # int64 (N,): positions in the sample list
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of undecodable files
    from_cache: bool = False

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        failed = sorted({f for p in parts for f in p.failed})
        return Features(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]),
                        torch.cat([p.indices for p in parts]), failed, all(p.from_cache for p in parts))


def files_fingerprint(samples: Sequence[Sample]) -> str:
    """sha256 over the content of every file, in order (hymenoptera's 398 files, 47 MB, from the page cache: about 0.07 s here)."""
    h = hashlib.sha256()
    for s in samples:
        try:
            h.update(hashlib.sha256(Path(s.path).read_bytes()).digest())
        except OSError as e:
            h.update(f"unreadable:{s.path}:{e}".encode())
    return h.hexdigest()


CALIBRATION_IMAGES = 300  # precision int8: training images whose activations set the ranges


def calibration_inputs(samples: Sequence[Sample], *, runtime: Runtime, pre: Preprocessing,
                       workers: int = 0) -> list[torch.Tensor]:
    """Up to CALIBRATION_IMAGES of `samples` (spread over them), through the eval transform, as
    `runtime.inputs` gives them: float (1, 3, S, S) each, for an int8 copy's calibration."""
    loader = make_loader(ImageDataset(spread(samples, CALIBRATION_IMAGES), pre.eval_transform()),
                         batch_size=INFERENCE_BATCH_SIZE, shuffle=False, workers=workers)
    return [x.unsqueeze(0) for b in loader for x in runtime.inputs(b.images, pre)]


def extract_features(model: nn.Module, samples: Sequence[Sample], *, runtime: Runtime, pre: Preprocessing,
                     view: int = 0, seed: int = 0, batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 0,
                     cache_key: str | None = None, files_key: str | None = None, images: int | None = None,
                     backbone: Callable[[], nn.Module] | None = None,
                     on_batch: Callable[[int, int], None] | None = None) -> Features:
    """Pooled backbone features of `samples` for one view (0 = eval transform, v >= 1 = augmented).

    `model` is the full network (its `forward_features` is used, in eval mode, through
    `runtime.inference_model`). `images` (default: len(samples)) is the run's image count, which
    picks the engine; `backbone`, if given, makes that inference copy once for several calls (it is
    called only when features must be computed). With `cache_key` (a fingerprint of the weights),
    results are kept under `<cache_dir()>/features/`, keyed also by the numerics (engine and
    precision: bf16 features differ from fp32 ones in the third digit).
    """
    images = len(samples) if images is None else images
    group = runtime.group  # data-parallel: each rank computes its share, and every rank gets them all
    path = None
    if cache_key is not None:
        key = hashlib.sha256(json.dumps({
            "weights": cache_key, "preprocessing": pre.to_dict(), "view": view,
            "decoder": 2,  # 2: evaluation decodes whole JPEGs (1 decoded large ones reduced, in features cached then)
            "numerics": [runtime.engine_for(images), runtime.precision, runtime.device.type,
                         *(["int8"] if runtime.int8_features else [])],
            "seed": seed if view else None, "files": files_key or files_fingerprint(samples), "n": len(samples),
        }, sort_keys=True).encode()).hexdigest()[:32]
        path = cache_dir() / "features" / f"{key}.safetensors"
        found = _read_cached(path)
        if not group.any(found is None):  # (a rank without them, another node's cache: every rank computes)
            log.info("features of %d images (view %d) from %s", len(samples), view, path)
            # the labels are the caller's (the key is the files, not what they are labelled: similar's
            # reference images and training's may be the same files)
            found.labels = torch.tensor([samples[i].label for i in found.indices.tolist()], dtype=torch.long)
            return found
    transform = pre.eval_transform() if view == 0 else pre.train_transform()
    loader = make_loader(ImageDataset(samples, transform, seed=seed), batch_size=batch_size, shuffle=False,
                         workers=workers, rank=group.rank, world=group.world)
    loader.batch_sampler.set_epoch(view)
    net = backbone() if backbone else runtime.inference_model(model, features=True, images=images)
    inf = run_inference(net, loader, runtime, pre, on_batch=on_batch)
    indices, (features, labels), failed = group.gather_rows(inf.indices, [inf.outputs.float(), inf.labels],
                                                            inf.failed)
    out = Features(features, labels, indices, failed)
    if path is not None and group.local_rank == 0:
        write_safetensors(path, {"features": out.features, "labels": out.labels, "indices": out.indices},
                          {"failed": json.dumps(out.failed)})
    return out


def _read_cached(path: Path) -> Features | None:
    if not path.exists():
        return None
    try:
        tensors, meta = read_safetensors(path)
        failed = [tuple(f) for f in json.loads(meta.get("failed", "[]"))]
        return Features(tensors["features"], tensors["labels"], tensors["indices"], failed, True)
    except (ValueError, KeyError) as e:
        log.warning("ignoring unreadable feature cache %s: %s", path, e)
        return None
