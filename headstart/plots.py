"""Pictures (matplotlib, headless): a batch with its labels, predictions, training curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import torch  # noqa: E402

from .download import atomic_write  # noqa: E402

RIGHT, WRONG = "blue", "red"


def spread_indices(n: int, k: int) -> list[int]:
    """Up to k indices spread evenly over range(n) (so a class-sorted list shows every class)."""
    if n <= k:
        return list(range(n))
    return sorted({int(i * n / k) for i in range(k)})


def _grid(images: torch.Tensor, titles: Sequence[str], colors: Sequence[str], cols: int = 6):
    """uint8 (N, 3, H, W) images in a grid, each titled."""
    n = max(len(images), 1)
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img, title, color in zip(axes.flat, images, titles, colors):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(title, color=color, fontsize=10)
    fig.tight_layout()
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def save_titled_grid(path: str | Path, images: torch.Tensor, titles: Sequence[str], colors: Sequence[str],
                     *, empty: str = "nothing to show") -> Path:
    """Images with a title each; a picture saying `empty` when there are none."""
    if len(images) == 0:
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, empty, ha="center", va="center", fontsize=12)
        return _save(fig, path)
    return _save(_grid(images, titles, colors), path)


def save_batch_grid(path: str | Path, images: torch.Tensor, labels: Sequence[int], classes: Sequence[str]) -> Path:
    """A batch of (augmented) training images titled with their label, as the tutorial shows."""
    return _save(_grid(images, [classes[i] for i in labels], ["black"] * len(labels)), path)


def save_prediction_grid(path: str | Path, images: torch.Tensor, true: Sequence[int], pred: Sequence[int],
                         classes: Sequence[str]) -> Path:
    """Images titled with the predicted class: blue when right, red when wrong."""
    colors = [RIGHT if t == p else WRONG for t, p in zip(true, pred)]
    return _save(_grid(images, [classes[p] for p in pred], colors), path)


def save_curves(path: str | Path, history: Sequence[dict[str, Any]]) -> Path:
    """Loss (train and val) and val accuracy per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(epochs, [h["train_acc"] for h in history], "o-", label="train")
    b.plot(epochs, [h["val_acc"] for h in history], "o-", label="val")
    b.set(xlabel="epoch", ylabel="accuracy", title="accuracy", ylim=(0, 1.02))
    b.legend()
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return _save(fig, path)


def show_batch(data: str | Path, *, out: str | Path, batch_size: int = 18, seed: int = 0, image_size: int = 224,
               val_split: float | None = None) -> Path:
    """Draw one shuffled, augmented training batch of a dataset with its labels (what the model sees)."""
    from .data import ImageDataset, make_loader, scan_dataset
    from .preprocessing import Preprocessing

    splits = scan_dataset(data, val_split=val_split, seed=seed)
    pre = Preprocessing(image_size=image_size)
    loader = make_loader(ImageDataset(splits.train, pre.train_transform(), seed=seed), batch_size=batch_size,
                         shuffle=True, seed=seed)
    batch = next(iter(loader))
    return save_batch_grid(out, batch.images, batch.labels.tolist(), splits.classes)
