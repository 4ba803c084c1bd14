"""One image, whichever way it comes in (a path, bytes, a PIL image, an array): decoded once, as
the model's preprocessing says (data.images.open_image: header, pixel guard ->
data.transforms.EvalTransform: full decode, EXIF rotation, any mode to RGB, shorter side to
resize_size, centre S x S) -> uint8 (3, S, S).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from headstart.data import IMAGE_ERRORS, collect_files, open_image

# What `decode` takes: a path, an image's bytes, a PIL image, or an array uint8 (H, W), (H, W, 3) RGB
# or (H, W, 4) RGBA
ImageLike = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]


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


class DecodedImages(torch.utils.data.Dataset):
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


def is_single_image(images: Any) -> bool:
    """One image (a path, bytes, a PIL image, an array), not a list or another iterable of them."""
    return isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image, np.ndarray)) or \
        not isinstance(images, Iterable)


def expand_images(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image or several, as a list: paths as collect_files gives them (a folder: its images;
    FileNotFoundError for none), the rest as given."""
    out: list[ImageLike] = []
    for s in [images] if is_single_image(images) else images:
        out += collect_files([s]) if isinstance(s, (str, os.PathLike)) else [s]
    return out


def image_name(source: ImageLike, i: int) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "filename", "") or f"image {i}"


def check_top_k(k: int) -> int:
    """`k` where it is a number of classes to list (1 or more); ValueError naming it otherwise."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")
    return k


def refuse_failed(sources: Sequence[ImageLike], failed: list[tuple[int, str]]) -> None:
    if failed:
        i, reason = failed[0]
        raise ValueError(f"{image_name(sources[i], i)} is not a readable image ({reason})"
                         f"{f' (and {len(failed) - 1} more)' if len(failed) > 1 else ''}")
