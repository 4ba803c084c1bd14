"""Decode + augment speed per worker (one process) on hymenoptera's train images.

    python bench/data.py

plain Pillow: open, full decode, convert to RGB, random resized crop (crop + resize), flip, float
tensor normalised. headstart: its TrainTransform / EvalTransform (JPEG draft decoding sized to the
crop, one resize from the crop box, uint8 out; normalisation happens later on the batch).
Last line: data_speedup=<headstart train img/s / plain train img/s>.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
from _common import HYMENOPTERA, cpu_line, machine, table
from PIL import Image

from headstart.data import list_images
from headstart.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def plain_train(path, rng: random.Random) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    for _ in range(10):
        area = w * h * rng.uniform(0.08, 1.0)
        ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        cw, ch = int(round((area * ar) ** 0.5)), int(round((area / ar) ** 0.5))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            break
    else:
        cw, ch, x, y = min(w, h), min(w, h), (w - min(w, h)) // 2, (h - min(w, h)) // 2
    img = img.crop((x, y, x + cw, y + ch)).resize((224, 224), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    t = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)
    return (t - MEAN) / STD


def plain_eval(path, rng: random.Random) -> torch.Tensor:
    img = Image.open(path).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR)
    w, h = img.size
    x, y = (w - 224) // 2, (h - 224) // 2
    t = torch.from_numpy(np.asarray(img.crop((x, y, x + 224, y + 224)), dtype=np.float32) / 255).permute(2, 0, 1)
    return (t - MEAN) / STD


def rate(fn, files, passes: int = 2) -> float:
    rng = random.Random(0)
    for p in files[:10]:
        fn(p, rng)
    t = time.perf_counter()
    for _ in range(passes):
        for p in files:
            fn(p, rng)
    return passes * len(files) / (time.perf_counter() - t)


def main() -> None:
    torch.set_num_threads(1)
    files = list_images(HYMENOPTERA / "train")
    pre = Preprocessing()
    train_tf, eval_tf = pre.train_transform(), pre.eval_transform()

    def hs_train(p, rng):
        with Image.open(p) as img:
            return train_tf(img, rng)

    def hs_eval(p, rng):
        with Image.open(p) as img:
            return eval_tf(img)

    r = {k: rate(f, files) for k, f in
         {"plain train": plain_train, "headstart train": hs_train, "plain eval": plain_eval, "headstart eval": hs_eval}.items()}
    print(f"machine: {machine()}; {len(files)} hymenoptera train images, one process, one thread")
    print(cpu_line())
    print(table([
        ["train: random resized crop 224 + flip", f"{r['plain train']:.0f}", f"{r['headstart train']:.0f}",
         f"{r['headstart train'] / r['plain train']:.2f}x"],
        ["eval: resize 256 + centre crop 224", f"{r['plain eval']:.0f}", f"{r['headstart eval']:.0f}",
         f"{r['headstart eval'] / r['plain eval']:.2f}x"],
    ], ["transform (per worker)", "plain Pillow img/s", "headstart img/s", "speedup"]))
    print(f"data_speedup={r['headstart train'] / r['plain train']:.2f}")


if __name__ == "__main__":
    main()
