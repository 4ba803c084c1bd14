"""Batches for training and inference: `ImageDataset` decodes and transforms each sample
(data/transforms.py) into uint8 (3, S, S); `make_loader` batches them (N, 3, S, S) with integer
labels, a data-parallel rank's share of every batch, and the seeded order of each epoch. No networks
here.
"""

from __future__ import annotations

import hashlib
import math
import random
import signal
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch

from headstart.data.images import IMAGE_ERRORS, open_image
from headstart.data.samples import Sample
from headstart.data.transforms import Transform


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-(seed, epoch, sample) seed, independent of worker processes and batch order."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest(), "little")


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> (uint8 image (3, S, S) or None, label, index).

    Indexed by (index, epoch) pairs (see `EpochBatches`) so that augmentation depends only on the
    seed, the epoch and the sample. A file that cannot be decoded gives None, never an exception:
    the batch drops it and reports it (`Batch.failed`).
    """

    def __init__(self, samples: Sequence[Sample], transform: Transform, *, seed: int = 0,
                 size: Callable[[int], int] | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.seed = seed
        self.size = size  # the crop's side per epoch (preprocessing.CropSchedule); None: the transform's own

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor | None, int, int, str]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        sample = self.samples[index]
        rng = random.Random(sample_seed(self.seed, epoch, index))
        try:
            with open_image(sample.path) as img:
                size = self.size(epoch) if self.size is not None else None
                return self.transform(img, rng, size=size), sample.label, index, ""
        except IMAGE_ERRORS as e:
            return None, sample.label, index, f"{type(e).__name__}: {e}"


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: torch.Tensor  # int64 (N,)
    indices: torch.Tensor  # int64 (N,): positions in the dataset's sample list
    failed: list[tuple[int, str]] = field(default_factory=list)  # (index, reason) of undecodable files

    def __len__(self) -> int:
        return len(self.labels)


def collate(items: list[tuple[torch.Tensor | None, int, int, str]]) -> Batch:
    ok = [it for it in items if it[0] is not None]
    failed = [(it[2], it[3]) for it in items if it[0] is None]
    if not ok:
        return Batch(torch.empty(0, 3, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long),
                     torch.empty(0, dtype=torch.long), failed)
    return Batch(torch.stack([it[0] for it in ok]), torch.tensor([it[1] for it in ok]),
                 torch.tensor([it[2] for it in ok]), failed)


class EpochBatches(torch.utils.data.Sampler):
    """Batches of (index, epoch) pairs: epoch `epoch`'s order of the n samples (shuffled by a
    generator seeded by (seed, epoch) if `shuffle`) cut into batches of `batch_size`. A process of a
    data-parallel group (`rank` of `world`, runtime/distributed.py) takes every world-th sample of each
    batch, so the group's batches together are one process's, whatever the group's size; every
    rank has as many batches (the last may be empty on some). Call `set_epoch` before each epoch."""

    def __init__(self, n: int, *, batch_size: int, shuffle: bool, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world, self.epoch, self.start = rank, world, 0, 0

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        """Use epoch `epoch`'s order, from batch `start` on (to resume an interrupted epoch)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return max(0, math.ceil(self.n / self.batch_size) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1) % 2**63)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        for b in range(self.start * self.batch_size, self.n, self.batch_size):
            yield [(i, self.epoch) for i in order[b:b + self.batch_size][self.rank::self.world]]


def make_loader(dataset: ImageDataset, *, batch_size: int, shuffle: bool, workers: int = 0,
                seed: int = 0, rank: int = 0, world: int = 1) -> torch.utils.data.DataLoader:
    """A DataLoader of `Batch`es over an ImageDataset; `loader.batch_sampler.set_epoch(e)` per
    epoch. `rank`, `world`: this process's share of each batch (see EpochBatches)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"workers must be 0 or more, got {workers}")
    batches = EpochBatches(len(dataset), batch_size=batch_size, shuffle=shuffle, seed=seed, rank=rank, world=world)
    # Persistent workers: forked once. Forked again every epoch, they made each training step about 20%
    # slower (0.92 -> 1.16 s, hymenoptera, amx): the parent's pages written after each fork are copied.
    # Whoever keeps a loader drops it when done (Strategy.close): its workers then end at once, where a
    # later garbage collection would wait 5 s a worker (it closes their queues before the loader).
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=collate, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None, worker_init_fn=_ignore_interrupts if workers > 0 else None,
    )


def _ignore_interrupts(worker_id: int) -> None:
    """Workers leave Ctrl-C to the main process, which finishes its step and saves."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
