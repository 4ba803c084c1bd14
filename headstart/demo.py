"""The tutorial, end to end: show a batch, fine-tune, train the head on a frozen backbone.

Its dataset is `data` when given, else the tutorial's own dogs-vs-wolves set (`Canidae_data.zip`),
downloaded once into the cache when the network allows.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from .download import Progress, cache_dir, download
from .models import get_model_info
from .plots import show_batch
from .training import Callback, RunResult, TrainConfig, train

CANIDAE_URL = ("https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/"
               "intermediate/Canidae_data.zip")


def extract_zip(archive: Path, dest: Path) -> None:
    """Extract `archive` into `dest`, refusing members that would land outside it."""
    with zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            p = PurePosixPath(name)
            if p.is_absolute() or ".." in p.parts:
                raise ValueError(f"{archive} holds an unsafe path {name!r}; not extracting it")
        z.extractall(dest)


def fetch_canidae(*, url: str = CANIDAE_URL, progress: Progress | None = None) -> Path:
    """The tutorial's dataset (train/ and val/, dogs and wolves), downloaded and extracted once."""
    root = cache_dir() / "datasets" / "Canidae"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    archive = cache_dir() / "downloads" / "Canidae_data.zip"
    if not archive.exists():
        download(url, archive, progress=progress)
    with tempfile.TemporaryDirectory(dir=root.parent if root.parent.exists() else None) as tmp:
        extract_zip(archive, Path(tmp))
        found = [p.parent for p in Path(tmp).rglob("train") if p.is_dir() and (p.parent / "val").is_dir()]
        if not found:
            raise ValueError(f"{archive} has no folder with train/ and val/ inside; delete it and retry")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(found[0]), root)
    return root


@dataclass
class DemoResult:
    data: Path
    out: Path
    batch_picture: Path
    runs: dict[str, RunResult] = field(default_factory=dict)


def run_demo(*, data: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] = "runs/demo",
             config: TrainConfig | None = None, url: str = CANIDAE_URL, callback: Callback | None = None,
             progress: Progress | None = None) -> DemoResult:
    """Both of the tutorial's strategies on one dataset; `config` sets everything but the strategy."""
    if data is None:
        try:
            data = fetch_canidae(url=url, progress=progress)
        except ConnectionError as e:
            raise FileNotFoundError(
                f"no dataset: the tutorial's Canidae_data.zip could not be downloaded ({e}). Pass a folder "
                "with train/ and val/ class folders, e.g. `headstart demo --data ../shared/datasets/hymenoptera`"
            ) from e
    data, out = Path(data), Path(out)
    config = config or TrainConfig()
    image_size = config.image_size or get_model_info(config.arch).preprocessing.image_size
    result = DemoResult(data, out, show_batch(data, out=out / "batch.png", batch_size=config.batch_size,
                                              seed=config.seed, image_size=image_size, val_split=config.val_split))
    for strategy in ("finetune", "frozen"):
        run_config = replace(config, strategy=strategy, momentum=None)
        result.runs[strategy] = train(data, out=out / strategy, config=run_config, callback=callback)
    return result
