"""Running a network over images: the building block of prediction, evaluation, validation during
training and the frozen strategy's features.

    loader of uint8 batches -> Runtime.inputs (normalised, channels_last) -> Runtime.outputs
    (PyTorch one batch at a time, or OpenVINO with several in flight) -> Inference
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from headstart.data import Batch, ImageDataset, Sample, make_loader
from headstart.data.transforms import Preprocessing
from headstart.runtime.device import Runtime

INFERENCE_BATCH_SIZE = 32  # images per batch wherever nothing trains (ResNet50: about 1.9 GB at bf16)


@dataclass
class Inference:
    outputs: torch.Tensor  # float32 (N, K): logits, or backbone features; for the images that decoded
    labels: torch.Tensor  # int64 (N,)
    indices: torch.Tensor  # int64 (N,): positions in the dataset
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of undecodable files


def run_inference(model: nn.Module, loader: torch.utils.data.DataLoader, runtime: Runtime,
                  pre: Preprocessing, *, on_batch: Callable[[int, int], None] | None = None) -> Inference:
    """Outputs for every decodable image of `loader` (model in eval mode); `on_batch(step, steps)`
    after each batch is read (OpenVINO has a few more batches in flight than were answered)."""
    model.eval()
    outputs, labels, indices, failed = [], [], [], []

    def inputs() -> Iterator[tuple[Batch, torch.Tensor]]:
        for step, batch in enumerate(loader):
            failed.extend(batch.failed)
            if len(batch):
                yield batch, runtime.inputs(batch.images, pre)
            if on_batch:
                on_batch(step + 1, len(loader))

    for batch, out in runtime.outputs(model, inputs()):
        outputs.append(out)
        labels.append(batch.labels)
        indices.append(batch.indices)
    if not outputs:
        return Inference(torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), failed)
    return Inference(torch.cat(outputs), torch.cat(labels), torch.cat(indices), failed)


def infer(model: nn.Module, samples: Sequence[Sample], *, runtime: Runtime, pre: Preprocessing,
          batch_size: int = INFERENCE_BATCH_SIZE, workers: int = 0,
          on_batch: Callable[[int, int], None] | None = None) -> Inference:
    """Logits of `model` (a trained network, left as it is) for `samples` through the eval
    transform, on an inference copy that `runtime` picks for that many images."""
    fast = runtime.inference_model(model, images=len(samples))
    loader = make_loader(ImageDataset(samples, pre.eval_transform()), batch_size=batch_size, shuffle=False,
                         workers=workers)
    return run_inference(fast, loader, runtime, pre, on_batch=on_batch)
