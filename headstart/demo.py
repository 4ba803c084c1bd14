"""The tutorial, end to end: show a batch, fine-tune, train the head on a frozen backbone.

Its dataset is `data` when given; else the tutorial's own dogs-vs-wolves set (`Canidae_data.zip`),
downloaded once into the cache when the network allows; else, offline, a dataset that installs
from the package index: the solar cells of `elpv-dataset` (`pip download`, sha256-checked, never
installed), as two class folders made reproducibly from its labels.
"""

from __future__ import annotations

import csv
import io
import os
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from headstart.data import ImageDataset, make_loader, scan_dataset
from headstart.io.download import Progress, cache_dir, download, fetch_wheel
from headstart.io.runfolder import default_run_folder
from headstart.models import create_model, get_model_info
from headstart.report.plots import show_batch
from headstart.runtime.clock import format_duration
from headstart.runtime.device import resolve_runtime
from headstart.training import Callback, RunResult, TrainConfig, train
from headstart.training.epochs import time_training_steps

CANIDAE_URL = ("https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/"
               "intermediate/Canidae_data.zip")
CANIDAE_ABOUT = "the MindSpore tutorial's dogs and wolves (Canidae_data.zip, from ImageNet)"

# elpv-dataset: 2,624 electroluminescence images of solar cells, 300x300 greyscale, each with the
# probability that it is defective (0, 1/3, 2/3, 1) in labels.csv.
ELPV = ("elpv-dataset", "1.0.0.post1", "85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c")
ELPV_ABOUT = ("solar cells from PyPI elpv-dataset 1.0.0.post1 (Buerhop-Lutz, Deitsch et al., ZAE Bayern; "
              "https://github.com/zae-bayern/elpv-dataset): {train} + {val} images per class, functional "
              "(defect probability 0) vs defective (probability 1); licence CC BY-NC-SA 4.0 (non-commercial use)")
ELPV_CLASSES = {"functional": 0.0, "defective": 1.0}  # the cells whose label is sure; 1/3 and 2/3 are left out
ELPV_PER_CLASS = (60, 30)  # train, val: a fine-tune of 10 epochs in minutes even on an AVX2 CPU


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
        download(url, archive, progress=progress, timeout=20)
    with tempfile.TemporaryDirectory(dir=root.parent if root.parent.exists() else None) as tmp:
        extract_zip(archive, Path(tmp))
        found = [p.parent for p in Path(tmp).rglob("train") if p.is_dir() and (p.parent / "val").is_dir()]
        if not found:
            raise ValueError(f"{archive} has no folder with train/ and val/ inside; delete it and retry")
        root.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        shutil.move(str(found[0]), root)
    return root


def fetch_elpv(*, per_class: tuple[int, int] = ELPV_PER_CLASS, seed: int = 0) -> Path:
    """The solar cells as `train/` and `val/` class folders (functional, defective): `per_class`
    (train, val) images of each, drawn by a seeded shuffle of the sorted file names; made once."""
    n_train, n_val = per_class
    root = cache_dir() / "datasets" / f"elpv-{ELPV[1]}-{n_train}-{n_val}-seed{seed}"
    if (root / "train").is_dir() and (root / "val").is_dir():
        return root
    package, version, sha256 = ELPV
    with zipfile.ZipFile(fetch_wheel(package, version, sha256=sha256)) as z:
        rows = csv.reader(io.StringIO(z.read("elpv_dataset/data/labels.csv").decode()), delimiter=" ",
                          skipinitialspace=True)
        labels = {path: float(prob) for path, prob, *_ in rows}
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root.parent))  # made whole, then renamed into place
        try:
            for cls, prob in ELPV_CLASSES.items():
                names = sorted(p for p, q in labels.items() if q == prob)
                random.Random(f"{seed}:{cls}").shuffle(names)
                if len(names) < n_train + n_val:
                    raise ValueError(f"{package} has {len(names)} {cls} cells, fewer than {n_train + n_val}")
                for split, picked in (("train", names[:n_train]), ("val", names[n_train:n_train + n_val])):
                    folder = tmp / split / cls
                    folder.mkdir(parents=True)
                    for name in picked:
                        (folder / PurePosixPath(name).name).write_bytes(z.read(f"elpv_dataset/data/{name}"))
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def demo_dataset(*, url: str = CANIDAE_URL, progress: Progress | None = None,
                 callback: Callback | None = None) -> tuple[Path, str]:
    """(folder, what it is): the tutorial's data where it downloads, else the solar cells."""
    try:
        return fetch_canidae(url=url, progress=progress), CANIDAE_ABOUT
    except ConnectionError as e:
        if callback:
            callback.on_message(f"the tutorial's Canidae_data.zip cannot be downloaded here ({e}); using solar cells "
                                "from the package index instead")
    try:
        return fetch_elpv(per_class=ELPV_PER_CLASS), ELPV_ABOUT.format(train=ELPV_PER_CLASS[0], val=ELPV_PER_CLASS[1])
    except ConnectionError as e:
        raise FileNotFoundError(
            f"no dataset: neither the tutorial's Canidae_data.zip nor the elpv-dataset wheel could be fetched ({e}). "
            "Pass a folder with train/ and val/ class folders: `headstart demo --data DIR`") from e


@dataclass
class DemoResult:
    data: Path
    about: str  # which data, and its licence
    out: Path
    batch_picture: Path
    estimate_s: float
    runs: dict[str, RunResult] = field(default_factory=dict)
    wall_time: float = 0.0


def run_demo(*, data: str | os.PathLike[str] | None = None, out: str | os.PathLike[str] | None = None,
             config: TrainConfig | None = None, url: str = CANIDAE_URL, callback: Callback | None = None,
             progress: Progress | None = None, overwrite: bool = False) -> DemoResult:
    """Both of the tutorial's strategies on one dataset; `config` sets everything but the strategy.
    `out` defaults to runs/demo (runs/demo-2... when that holds a demo already); `overwrite`
    replaces a demo (or other files) there."""
    started = time.perf_counter()
    callback = callback or Callback()
    about = "the folder given"
    if data is None:
        data, about = demo_dataset(url=url, progress=progress, callback=callback)
    data = Path(data)
    out = Path(out) if out is not None else default_run_folder(data, "demo")
    config = config or TrainConfig()
    callback.on_message(f"dataset: {data}: {about}")
    runs = {s: replace(config, strategy=s, momentum=None) for s in ("finetune", "frozen")}
    estimate = _estimate(data, config)
    callback.on_message(f"estimated {format_duration(estimate)} for the demo: a fine-tune of {config.epochs} "
                        f"epochs, then {config.epochs} epochs of the head on the frozen backbone's features")
    info = get_model_info(config.arch)
    image_size = config.image_size or info.preprocessing.image_size
    result = DemoResult(data, about, out, show_batch(data, out=out / "batch.png", batch_size=config.batch_size,
                                                     seed=config.seed, image_size=image_size,
                                                     val_split=config.val_split, overwrite=overwrite), estimate)
    for strategy, run_config in runs.items():
        result.runs[strategy] = train(data, out=out / strategy, config=run_config, callback=callback,
                                      overwrite=overwrite)
    result.wall_time = time.perf_counter() - started
    return result


def _estimate(data: Path, config: TrainConfig) -> float:
    """Seconds the demo will take, from two fine-tune steps timed now (after one that warms up): the
    fine-tune's steps and validations, and the frozen run's one pass over every image, a forward
    pass costing about a third of a training step per image (24.3 against 8.2 GFLOP for ResNet50)."""
    splits = scan_dataset(data, val_split=config.val_split, seed=config.seed)
    pre = get_model_info(config.arch).preprocessing.with_sizes(config.image_size, config.train_size)
    runtime = resolve_runtime(device=config.device, precision=config.precision, threads=config.threads,
                              engine=config.engine)
    model = runtime.prepare(create_model(config.arch, num_classes=len(splits.classes), weights=config.weights))
    loader = make_loader(ImageDataset(splits.train, pre.train_transform(), seed=config.seed),
                         batch_size=config.batch_size, shuffle=True, workers=0, seed=config.seed)
    step = time_training_steps(model, loader, runtime, pre, first=0, config=config)
    forward = step / config.batch_size / 3  # s per image
    finetune = config.epochs * (len(loader) * step + len(splits.val) * forward)
    return finetune + (len(splits.train) + len(splits.val)) * forward
