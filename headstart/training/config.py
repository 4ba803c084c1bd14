"""Every option of a run, declared once (`TrainConfig`); the command line derives its flags from these
fields (cli/options.py): help, choices, the smallest valid value and how a text value is parsed."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable

from headstart.data import Columns
from headstart.runtime.clock import parse_duration
from headstart.runtime.device import ENGINES, PRECISIONS
from headstart.training.registry import STRATEGIES

SCHEDULES = ("constant", "cosine")
FEATURE_CACHES = ("off", "memory", "disk")
BAD_FILES = ("skip", "fail")


def option(default: Any, help: str | Callable[[], str], *, choices: Iterable[str] | None = None,
           minimum: float | None = None, parse: Callable[[str], Any] | None = None) -> Any:
    """A TrainConfig field with what the command line and the checks need: help text (or a function
    that writes it from the registries), the valid choices (a live container: the strategy
    registry), the smallest valid value, and `parse` for a value written as text (a duration)."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum, "parse": parse})


def parse_sizes(text: str) -> tuple[int, ...]:
    """'128,176' -> (128, 176); '' or 'none' -> ()."""
    if str(text).strip().lower() in ("", "none"):
        return ()
    try:
        sizes = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        sizes = ()
    if not sizes or not all(8 <= x <= 2048 for x in sizes):
        raise ValueError(f"train sizes {text!r} are not crop sizes like 128,176 (each from 8 to 2048)")
    return sizes


AUTO_PATIENCE = 2  # the default run's (auto's) --patience; an explicit strategy trains its --epochs unless given one


def parse_patience(text: str) -> int | None:
    """'3' -> 3; 'off' -> 0 (every epoch trains)."""
    if str(text).strip().lower() == "off":
        return 0
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"patience {text!r} is not a number of epochs (e.g. 2) or off") from None


def _strategy_help() -> str:
    return "; ".join(f"{s.name}: {s.description}" for s in STRATEGIES.values())


def _momentum_help() -> str:
    return "SGD momentum (default: " + ", ".join(f"{s.momentum} for {s.name}" for s in STRATEGIES.values()) + ")"


@dataclass
class TrainConfig:
    """Everything that defines a run; saved into every checkpoint. Defaults are the tutorial's."""

    arch: str = option("resnet50", "backbone name; see `headstart models`; auto: the one whose features a head fits "
                                   "best, of those with ImageNet weights here")
    weights: str | None = option(
        "imagenet", "'imagenet' (or another tag of the backbone), a checkpoint, a weights file or its http(s) URL "
        "(.safetensors, .pth, MindSpore .ckpt, TF.js model.json; a head with as many classes as DATA is kept), or "
        "'none' (random initialisation)")
    strategy: str = option("auto", _strategy_help, choices=STRATEGIES)
    train_from: str | None = option(None, "partial, gradual: the first stage that trains, e.g. layer3 of a ResNet "
                                          "(`headstart models` lists each backbone's; default: the last)")
    backbone_lr: float = option(0.1, "gradual, auto: the backbone's learning rate as a multiple of --lr", minimum=0)
    budget: float | None = option(None, "the time the whole run may take, e.g. 90s, 5m, 1h30m: auto plans for it; "
                                        "every strategy stops before an epoch that would end after it "
                                        "(default: none)", parse=parse_duration)
    epochs: int = option(10, "training epochs", minimum=1)
    batch_size: int = option(18, "training images per step", minimum=1)
    lr: float = option(0.001, "learning rate")
    momentum: float | None = option(None, _momentum_help, minimum=0)
    weight_decay: float = option(0.0, "SGD weight decay", minimum=0)
    schedule: str = option("constant", "learning-rate schedule: constant, or cosine per step down to 1% of lr",
                           choices=SCHEDULES)
    image_size: int | None = option(None, "crop size (default: the backbone's, 224 for the ResNets)", minimum=8)
    train_size: int | None = option(None, "crop size of the training steps (default: --image-size); e.g. 160 or 176 "
                                          "with evaluation at 224: a step then costs about (160/224)^2 of one at 224",
                                    minimum=8)
    train_sizes: tuple[int, ...] = option((), "progressive resizing: the crop sizes of the first epochs, one each "
                                                 "(e.g. 128,176), before --train-size (or --image-size) for the rest; "
                                                 "none: every epoch at one size", parse=parse_sizes)
    warmup: float = option(0.0, "epochs of linear learning-rate warm-up from 1% of --lr at the start of training "
                                "(e.g. 0.5)", minimum=0)
    patience: int | None = option(None, "stop after this many epochs in which validation did not improve (its loss "
                                        "2% lower, or its accuracy higher by more than its noise on the split's "
                                        "size; --epochs stays the most); off (0): train every epoch (default: "
                                        f"{AUTO_PATIENCE} for auto, off for the other strategies)", minimum=0,
                                  parse=parse_patience)
    val_split: float | None = option(None, "for a folder of class folders without train/ and val/ (or a table "
                                           "without a split column): the fraction "
                                           "held out for validation, e.g. 0.2 (seeded, stratified)")
    path_column: str | None = option(None, "DATA is a table (.csv, .tsv): its column of image paths, relative to the "
                                           "table's folder or absolute (default: the column headed path, file, image "
                                           "or filename)")
    label_column: str | None = option(None, "DATA is a table: its column of labels (default: the column headed "
                                            "label, class or category)")
    allow_outside: bool = option(False, "DATA is a table: let a relative path leave the table's folder (..)")
    seed: int = option(0, "seed of the new head, the augmentation and the order of the images")
    workers: int = option(2, "data-loading worker processes", minimum=0)
    precision: str = option("auto", "auto: bf16 where the CPU or GPU supports it, else fp32; int8: the frozen "
                                    "backbone's features (and predict's model) quantized by NNCF, run by OpenVINO",
                            choices=PRECISIONS)
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    threads: int | None = option(None, "compute threads (default: one per core)", minimum=1)
    compile: bool = option(False, "torch.compile the network (the first call costs 25-100 s on a CPU)")
    engine: str = option("auto", "what runs inference (validation, frozen features, prediction, evaluation); auto: "
                                 "OpenVINO on a CPU where installed (validation during fine-tuning: from 256 images, "
                                 "which pay back its conversion)", choices=ENGINES)
    feature_cache: str = option("disk", "frozen strategy: compute backbone features once and train the head on them, "
                                        "kept in memory or also on disk for later runs; off runs the backbone every "
                                        "step", choices=FEATURE_CACHES)
    views: int = option(0, "frozen with a feature cache: augmented views per image besides the plain one", minimum=0)
    save_every: float | None = option(300.0, "save the run state mid-epoch too, this often (e.g. 90s, 5m): a kill "
                                             "then loses at most this much training", parse=parse_duration)
    bad_files: str = option("skip", "files that cannot be read as images: skip them (each named once) or stop "
                                    "before training", choices=BAD_FILES)
    balance: bool = option(False, "weight the loss by inverse class frequency (for imbalanced classes)")
    sync_batchnorm: bool = option(False, "data-parallel runs: the BatchNorm layers that train use the statistics of "
                                         "the whole global batch, so the run gives one process's results (else each "
                                         "rank's own share, DDP's default: faster, no exchange per layer)")
    timeout: float = option(300.0, "data-parallel runs (torchrun, --nproc): how long a rank waits for the others "
                                   "(e.g. 90s, 10m) before it ends the run with an error", minimum=1,
                            parse=parse_duration)

    def columns(self) -> Columns:
        """How DATA is read where it is a table of labels."""
        return Columns(self.path_column, self.label_column, self.allow_outside)

    def __post_init__(self) -> None:
        if self.weights == "none":
            self.weights = None
        if isinstance(self.train_sizes, list):  # (from a run state's JSON)
            self.train_sizes = tuple(self.train_sizes)
        for f in fields(self):
            if f.metadata["parse"] is not None and isinstance(getattr(self, f.name), str):
                setattr(self, f.name, f.metadata["parse"](getattr(self, f.name)))
            value, choices, minimum = getattr(self, f.name), f.metadata["choices"], f.metadata["minimum"]
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name} {value!r} is not one of {', '.join(choices)}")
            if minimum is not None and value is not None and value < minimum:
                raise ValueError(f"{f.name} must be at least {minimum}, got {value}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.momentum is None:
            self.momentum = STRATEGIES[self.strategy].momentum
        if self.precision == "int8" and (self.strategy in ("finetune", "partial") or self.feature_cache == "off"):
            raise ValueError(f"precision int8 is for the frozen backbone's cached features, not strategy "
                             f"{self.strategy!r} with feature_cache {self.feature_cache!r}: use it with the frozen, "
                             "gradual or auto strategy and a feature cache (what trains runs in bf16 or fp32)")
        if self.arch == "auto" and self.weights != "imagenet":
            raise ValueError(f"arch 'auto' chooses among backbones with ImageNet weights; drop weights={self.weights!r} "
                             "(--weights) or name the backbone (--arch)")
