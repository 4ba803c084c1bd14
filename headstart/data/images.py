"""Image files: which files are images (by extension), every image of a folder or a list, and
opening one (a path, bytes or a file object) as a PIL image, with decompression-bomb and truncation
checks.
"""

from __future__ import annotations

import io
import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable

import numpy as np
from PIL import Image, ImageOps, features

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif",
    *((".avif",) if features.check("avif") else ()),  # where this Pillow reads AVIF
})


# What a broken image file raises somewhere inside Pillow, on open or on decode.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError, IndexError,
                struct.error, ZeroDivisionError, Image.DecompressionBombWarning)


RUN_MARKER = ".headstart-run"  # in every run folder (runfolder.claim_run_folder)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(folder: str | Path) -> list[Path]:
    """Image files below `folder` (recursive; symlinked folders followed, each real folder once;
    hidden names and run folders skipped), sorted."""
    out, seen = [], set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or two links to one folder: read once
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (Path(root) / d / RUN_MARKER).exists()]
        out += [Path(root) / f for f in files if is_image_file(Path(f))]
    return sorted(out)


def as_paths(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """One path or several, as a list (a string is one path, never its characters)."""
    return [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]


def collect_files(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files as given, and the image files below each folder (recursive, symlinked folders followed,
    hidden names skipped). `paths` is one path or several."""
    files: list[Path] = []
    for p in as_paths(paths):
        if p.is_dir():
            found = list_images(p)
            if not found:
                raise FileNotFoundError(f"no image files in {p} (or below it); extensions read: "
                                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}")
            files += found
        elif p.exists():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return files


# ---------------------------------------------------------------------------------------------
# Loading and batching.

def open_image(source: str | os.PathLike[str] | bytes | BinaryIO) -> Image.Image:
    """Open an image lazily (header only) from a path, its bytes or a binary file; raises one of
    IMAGE_ERRORS if it is not an image, DecompressionBombError over Pillow's pixel guard
    (`Image.MAX_IMAGE_PIXELS`, 89.5 M). That guard is checked here, the same for every command and
    thread: Pillow itself only warns between 1x and 2x of it, and a warnings filter set to turn that
    into an error is process-wide state that threads decoding side by side (serve) undo for each other."""
    img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        img.close()
        raise Image.DecompressionBombError(f"the image is {img.width}x{img.height} = {img.width * img.height} pixels, "
                                           f"over the limit of {limit} (Pillow's decompression-bomb guard)")
    return img


def load_image(path: str | Path) -> Image.Image:
    """Decode a whole image: EXIF orientation applied, any mode converted to 8-bit RGB."""
    with open_image(path) as img:
        return to_rgb(img)

def to_rgb(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation and convert any mode to 8-bit RGB.

    16- and 32-bit greyscale (I;16, I) are scaled from 0-65535, float (F) from 0-1; images with
    transparency (RGBA, LA, PA, P with a transparent colour) are composited onto white.
    """
    img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        else:
            arr = arr / 257.0
        return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")
