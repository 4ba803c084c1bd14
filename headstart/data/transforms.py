"""Image preprocessing: the train and eval transforms, and the config that carries them.

A `Preprocessing` travels with the weights (in each model's pretrained config) and with every
checkpoint, so prediction rebuilds exactly the transforms that training used.

The transforms work on PIL images and return uint8 tensors of shape (3, H, W). Normalisation
(float conversion, minus mean, over std) is applied to whole batches by `normalize`, on the device
that runs the model: a uint8 image is a quarter of the bytes to move between worker processes.

Defaults are the tutorial's: train = random resized crop 224, scale (0.08, 1), ratio (3/4, 4/3),
horizontal flip p=0.5; eval = resize the shorter side to 256 (224 / 0.875), centre crop 224.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from headstart.data.images import to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_SIZE = 2048  # larger crops are almost surely a mistake (or a hostile checkpoint)
MAX_RESIZED_PIXELS = 2**22  # eval: past this, the centre region is resized alone (EvalTransform)

_INTERPOLATIONS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """How images become model inputs. Serialised into every checkpoint as JSON."""

    image_size: int = 224
    crop_fraction: float = 0.875  # eval: resize the shorter side to image_size / crop_fraction
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    scale: tuple[float, float] = (0.08, 1.0)  # train: random resized crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # train: aspect ratio range
    hflip: float = 0.5  # train: horizontal flip probability
    train_size: int | None = None  # train: the crop's size (None: image_size); e.g. 160 to train faster

    def __post_init__(self) -> None:
        def numbers(name: str, n: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, tuple) or len(v) != n or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v):
                raise ValueError(f"{name} must be {n} finite numbers, got {v!r:.100}")

        for name in ("image_size", "train_size"):
            v = getattr(self, name)
            if (name == "image_size" or v is not None) and (not isinstance(v, int) or isinstance(v, bool)
                                                            or not 8 <= v <= MAX_IMAGE_SIZE):
                raise ValueError(f"{name}={v!r:.50} must be an integer from 8 to {MAX_IMAGE_SIZE} (224 is usual)")
        for name, n in (("mean", 3), ("std", 3), ("scale", 2), ("ratio", 2)):
            numbers(name, n)
        if min(self.std) <= 0 or not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"need std > 0, 0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1]; got "
                             f"std={self.std}, scale={self.scale}, ratio={self.ratio}")
        if not isinstance(self.hflip, (int, float)) or not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip={self.hflip!r:.50} must be a probability in [0, 1]")
        if not isinstance(self.crop_fraction, (int, float)) or not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction={self.crop_fraction} must be in (0, 1]; 0.875 is usual")
        if not isinstance(self.interpolation, str) or self.interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"interpolation={self.interpolation!r} is not one of {sorted(_INTERPOLATIONS)}"
            )

    @property
    def train_crop(self) -> int:
        """The size of a training crop: train_size, else image_size."""
        return self.train_size or self.image_size

    @property
    def resize_size(self) -> int:
        """Shorter side before the eval centre crop (256 for 224)."""
        return int(math.floor(self.image_size / self.crop_fraction))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known if isinstance(d, dict) else set()
        if unknown:
            raise ValueError(f"unknown preprocessing keys {sorted(unknown)}; known: {sorted(known)}")
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing must be a JSON object, got {type(d).__name__}")
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def with_sizes(self, image_size: int | None = None, train_size: int | None = None) -> "Preprocessing":
        """The same with another evaluation size and/or training crop size (None: keep it)."""
        return Preprocessing(**{**self.to_dict(), "image_size": image_size or self.image_size,
                                "train_size": train_size or self.train_size})

    def train_transform(self) -> "TrainTransform":
        return TrainTransform(self)

    def eval_transform(self) -> "EvalTransform":
        return EvalTransform(self)


def to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def normalize(batch: torch.Tensor, pre: Preprocessing, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float (N, 3, H, W): x / 255, minus mean, over std."""
    if batch.dtype != torch.uint8:
        raise TypeError(f"normalize expects a uint8 batch, got {batch.dtype}")
    mean = torch.tensor(pre.mean, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=batch.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return ((batch.float() - mean) / std).to(dtype)


_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 or 270 degrees


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as the image will be shown, after its EXIF orientation; decodes nothing."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block: treat as unrotated; decoding reports real damage
        orientation = 1
    return (h, w) if orientation in _SWAPS_AXES else (w, h)




def _resize_box(img: Image.Image, box: tuple[float, float, float, float], s: int, interpolation: str, *,
                reduce: bool = False) -> Image.Image:
    """Decode `img`, orient it, convert to RGB, and resize the region `box` (in oriented
    full-resolution pixels) to s x s.

    `reduce` (training's random crops only; `img` freshly opened, still lazy): a JPEG is decoded at
    the smallest DCT scale (1, 1/2, 1/4, 1/8) that still leaves `box` at least s pixels on each side:
    a 2592x1944 photo's crop, decoding included, takes 39 ms here instead of 76 ms (52 ms of full
    decode + 24 ms of resize). Evaluation never reduces: every entry point that answers for an image
    (predict, evaluate, serve, validation) decodes it whole, as an exported model's user does.
    """
    w, h = oriented_size(img)
    f = min((box[2] - box[0]) / s, (box[3] - box[1]) / s)
    if reduce and img.format == "JPEG" and f >= 2 and not getattr(img, "decoderconfig", ()):
        img.draft(None, (max(1, int(img.size[0] / f)), max(1, int(img.size[1] / f))))
    img = to_rgb(img)
    sx, sy = img.size[0] / w, img.size[1] / h
    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
    return img.resize((s, s), _INTERPOLATIONS[interpolation], box=box)


@dataclass
class TrainTransform:
    """Random resized crop + horizontal flip, on a PIL image; returns uint8 (3, S, S).

    Pass `rng` (a random.Random) to make the augmentation reproducible: the data loader seeds one per
    (seed, epoch, sample), so the result does not depend on the number of worker processes.
    """

    pre: Preprocessing

    def crop_box(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of a random crop with area in `scale` and aspect in `ratio`."""
        area = width * height
        log_ratio = (math.log(self.pre.ratio[0]), math.log(self.pre.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.pre.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                left = rng.randint(0, width - w)
                top = rng.randint(0, height - h)
                return left, top, left + w, top + h
        # Fallback: the largest centre crop whose aspect lies in `ratio`.
        in_ratio = width / height
        if in_ratio < self.pre.ratio[0]:
            w, h = width, int(round(width / self.pre.ratio[0]))
        elif in_ratio > self.pre.ratio[1]:
            w, h = int(round(height * self.pre.ratio[1])), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image, rng: random.Random | None = None, size: int | None = None) -> torch.Tensor:
        """`size`: the crop's side this epoch (progressive resizing: CropSchedule), else pre.train_crop."""
        rng = rng if rng is not None else random.Random()
        box = self.crop_box(*oriented_size(img), rng)
        out = _resize_box(img, box, size or self.pre.train_crop, self.pre.interpolation, reduce=True)
        if rng.random() < self.pre.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(out)


@dataclass
class EvalTransform:
    """Resize the shorter side to `resize_size`, centre crop `image_size`; returns uint8 (3, S, S).

    The image is decoded at full size (no JPEG draft), oriented and made RGB (`to_rgb`), resized
    whole, and its centre cut out with the offset rounded down: step for step what docs/export.md's
    snippet does for an exported model (export.documented_crop), so a file gives the same pixels
    whichever way it comes in. Resizing only the centre region would save about 10% (kite.jpg,
    1352x900: 26 ms against 29 ms, decode included) but rounds a few pixels one level apart; it is
    done only where the whole image, resized, would pass MAX_RESIZED_PIXELS (an image about 64 times
    as wide as high, or the reverse: a 121-byte 12000x1 PNG would take 3.3 GB and 3.6 s resized whole).
    """

    pre: Preprocessing

    def __call__(self, img: Image.Image, rng: random.Random | None = None, size: int | None = None) -> torch.Tensor:
        s = self.pre.image_size  # (`size`: a training crop's; evaluation keeps its own)
        img = to_rgb(img)
        scale = self.pre.resize_size / min(img.size)
        w, h = round(img.width * scale), round(img.height * scale)
        left, top = (w - s) // 2, (h - s) // 2
        resample = _INTERPOLATIONS[self.pre.interpolation]
        if w * h > MAX_RESIZED_PIXELS:  # a strip (4000x1...): the crop's region alone, not gigabytes for the whole
            sx, sy = img.width / w, img.height / h
            return to_uint8_tensor(img.resize((s, s), resample, box=(left * sx, top * sy, (left + s) * sx,
                                                                     (top + s) * sy)))
        return to_uint8_tensor(img.resize((w, h), resample).crop((left, top, left + s, top + s)))


Transform = Callable[..., torch.Tensor]  # (PIL image, rng=None, size=None) -> uint8 (3, S, S)


@dataclass(frozen=True)
class CropSchedule:
    """The training crop's side for each epoch: `first[0]` for epoch 1, `first[1]` for epoch 2...
    (progressive resizing: cheaper early epochs, a step costing about (size / 224)^2 of one at 224),
    then `rest` for every later epoch (and epoch 0, where a strategy times its steps)."""

    first: tuple[int, ...]
    rest: int

    def __call__(self, epoch: int) -> int:
        return self.first[epoch - 1] if 1 <= epoch <= len(self.first) else self.rest
