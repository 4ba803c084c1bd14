"""The evaluation decode: whole (headstart's, since every entry point answers with the same pixels)
against the reduced-size JPEG decode that predict and evaluate used before (Pillow's draft: the
smallest DCT scale that still leaves the centre crop at least S pixels a side, from a shorter side
of 512 on), per image, in one process, side by side.

    python bench/decode.py

Images: ../shared/photos (500x500 to 1352x900), hymenoptera's validation images (mostly about
500x375: the draft seldom applies), and kite.jpg re-encoded at 2592x1944 and 4032x3024 (phone
photos). Each row: the median of 5 timed passes over its images, after 2 warm-up passes; the ratio
is whole / reduced. What it costs a run: the model takes 10-20 ms an image (ResNet50, bf16,
OpenVINO, amx), so where decoding keeps up in the loader's workers the answer comes no later.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _common import HYMENOPTERA, SHARED, cpu_line, machine, median_time, table
from PIL import Image

from headstart.data import open_image
from headstart.data.transforms import Preprocessing, _resize_box, oriented_size, to_uint8_tensor


def reduced(path: Path, pre: Preprocessing) -> None:
    """The eval transform as it was: the centre region resized straight to S x S from a draft decode."""
    s, r = pre.image_size, pre.resize_size
    with open_image(path) as img:
        w, h = oriented_size(img)
        scale = r / min(w, h)
        rw, rh = max(s, round(w * scale)), max(s, round(h * scale))
        left, top = round((rw - s) / 2), round((rh - s) / 2)
        box = (left / rw * w, top / rh * h, (left + s) / rw * w, (top + s) / rh * h)
        to_uint8_tensor(_resize_box(img, box, s, pre.interpolation, reduce=True))


def whole(path: Path, pre: Preprocessing, transform=None) -> None:
    with open_image(path) as img:
        (transform or pre.eval_transform())(img)


def main() -> int:
    if not (SHARED / "photos").is_dir():
        print(f"needs {SHARED}/photos and {HYMENOPTERA}", file=sys.stderr)
        return 2
    pre = Preprocessing()
    transform = pre.eval_transform()
    tmp = Path(tempfile.mkdtemp())
    big = []
    with Image.open(SHARED / "photos" / "kite.jpg") as kite:
        for w, h in ((2592, 1944), (4032, 3024)):
            path = tmp / f"kite_{w}x{h}.jpg"
            kite.convert("RGB").resize((w, h), Image.Resampling.BICUBIC).save(path, quality=92)
            big.append(path)
    sets = {"photos (6, 500x500 to 1352x900)": sorted((SHARED / "photos").glob("*.jpg")),
            "hymenoptera val (153)": sorted((HYMENOPTERA / "val").rglob("*.jpg")),
            "kite at 2592x1944": big[:1], "kite at 4032x3024": big[1:]}
    rows = []
    for name, files in sets.items():
        t_reduced = median_time(lambda: [reduced(f, pre) for f in files]) / len(files)
        t_whole = median_time(lambda: [whole(f, pre, transform) for f in files]) / len(files)
        rows.append([name, f"{1000 * t_reduced:.1f}", f"{1000 * t_whole:.1f}", f"{t_whole / t_reduced:.2f}"])
    print(machine())
    print(cpu_line())
    print(table(rows, ["images", "reduced ms/image", "whole ms/image", "whole / reduced"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
