"""Where and how the network runs: device, numeric precision, memory format, threads.

`auto` picks the fast path a user would not know to ask for: on a CPU with AVX512_BF16 or AMX,
bf16 autocast with channels_last (oneDNN's AMX kernels; about 3x fp32 for ResNet50 here); on a CUDA
GPU, bf16 autocast where supported, else fp16 with a gradient scaler; otherwise fp32. Inference on
a CPU (prediction, evaluation, validation, the frozen strategy's features) runs in OpenVINO where it is
installed, for runs of at least `openvino.MIN_IMAGES` images (see runtime/openvino.py).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Iterator, TypeVar

import torch
from torch import nn
from torch.fx.experimental.optimization import fuse as fx_fuse

from headstart.data.transforms import Preprocessing, normalize
from headstart.runtime.distributed import SINGLE, Group, plain_batchnorm, threads_per_rank
from headstart.runtime.openvino import MIN_IMAGES, OpenVINOModel, openvino_available

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")  # int8: inference only (features, predict)
ENGINES = ("auto", "torch", "openvino")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
T = TypeVar("T")


CPU_CLASSES = ("amx", "avx512-bf16", "avx512", "avx2", "other")  # strongest first
_ISA_CLASS = {  # oneDNN's ONEDNN_MAX_CPU_ISA values -> the class they leave
    "sse41": "other", "avx": "other", "avx2": "avx2", "avx2_vnni": "avx2", "avx2_vnni_2": "avx2",
    "avx512_core": "avx512", "avx512_core_vnni": "avx512", "avx512_core_bf16": "avx512-bf16",
    "avx512_core_fp16": "avx512-bf16", "avx10_1_512": "avx512-bf16", "avx512_core_amx": "amx",
    "avx512_core_amx_fp16": "amx", "avx10_1_512_amx": "amx", "avx10_1_512_amx_fp16": "amx"}


@functools.cache
def cpu_class() -> str:
    """The class of this CPU for speed: "amx" (AMX-BF16 tiles: bf16 matmuls about 8x fp32), "avx512-bf16"
    (AVX-512 with bf16 dot products, no AMX: about 4x), "avx512", "avx2" (no native bf16), "other".
    oneDNN's ONEDNN_MAX_CPU_ISA caps it (=AVX2 makes an AVX-512 machine an avx2 one, to measure
    that class)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    found = ("amx" if "amx_bf16" in flags else "avx512-bf16" if "avx512_bf16" in flags
             else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other")
    cap = _ISA_CLASS.get(os.environ.get("ONEDNN_MAX_CPU_ISA", "").lower())
    return max(found, cap, key=CPU_CLASSES.index) if cap else found  # the weaker of the two


def cpu_has_bf16() -> bool:
    """True when the CPU (as oneDNN may use it) has native bf16 matrix instructions."""
    return cpu_class() in ("amx", "avx512-bf16")


@dataclass(frozen=True)
class Runtime:
    """Where and how the network runs. Activations are always channels_last (NHWC): oneDNN's bf16
    kernels and GPUs need it, and plain fp32 on a CPU gains about 30% too."""

    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model in place (the first call costs 25-100 s on a CPU)
    engine: str = "torch"  # torch | openvino: what runs inference_model's copies (training is torch)
    min_images: int = MIN_IMAGES  # the openvino engine's threshold (0 when asked for by name)
    # precision int8: a frozen backbone's features come from an int8 copy (NNCF's quantization,
    # calibrated on training images; OpenVINO); what trains still runs in `precision`
    int8_features: bool = False
    group: Group = SINGLE  # the data-parallel group this process trains in (distributed.py)

    def autocast(self) -> ContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move the model to the device, channels_last; parameters stay fp32."""
        model.to(self.device, memory_format=torch.channels_last)
        if self.compile:
            model.compile()
        return model

    def inputs(self, images: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
        """uint8 (N, 3, S, S) -> normalised float on the device, channels_last."""
        x = normalize(images.to(self.device, non_blocking=True), pre)
        return x.contiguous(memory_format=torch.channels_last)

    def inference_model(self, model: nn.Module, *, features: bool = False, images: int | None = None,
                        keep_graph: bool = True,
                        calibration: Callable[[], list[torch.Tensor]] | None = None) -> nn.Module:
        """A copy of `model` for inference, on the device, in eval mode. `features=True` gives a
        module whose forward is `forward_features`. `images` (how many it will see; None: many)
        decides whether OpenVINO's conversion pays: with the openvino engine and at least
        `min_images` images the copy is an `OpenVINOModel`, else it runs in PyTorch with each
        Conv2d -> BatchNorm2d pair folded into one conv (one memory pass fewer per layer: ResNet50
        bf16 eval goes from about 32 to 55 img/s here). `keep_graph=False`: weights that will change
        (validation in training), so OpenVINO's converted graph is not kept on disk. With
        `int8_features`, a features copy given `calibration` (a function returning inputs as
        `inputs` makes them, one image each) is quantized to int8 on them, whatever `images`."""
        m = plain_batchnorm(copy.deepcopy(model).eval())  # (a data-parallel run's SyncBatchNorm layers)
        if features:
            m = _ForwardFeatures(m)
        for p in m.parameters():
            p.requires_grad_(False)
        if self.int8_features and features and calibration is not None:
            return OpenVINOModel(m, precision=self.precision, threads=torch.get_num_threads(),
                                 fallback=lambda: self._torch_inference(m), keep=False, calibration=calibration)
        if self.engine_for(images) == "openvino":
            return OpenVINOModel(m, precision=self.precision, threads=torch.get_num_threads(),
                                 fallback=lambda: self._torch_inference(m), keep=keep_graph)
        return self._torch_inference(m)

    def outputs(self, model: nn.Module, batches: Iterable[tuple[T, torch.Tensor]]) -> Iterator[tuple[T, torch.Tensor]]:
        """(tag, float32 outputs on the CPU) for each (tag, input batch) of an `inference_model`
        copy, in order: OpenVINO keeps several batches in flight (`OpenVINOModel.pipeline`);
        PyTorch runs them one at a time, under autocast."""
        if isinstance(model, OpenVINOModel):  # (its parameters need no grad: no graph is recorded)
            yield from model.pipeline(batches)
            return
        for tag, x in batches:
            with torch.no_grad(), self.autocast():
                out = model(x)
            yield tag, out.float().cpu()

    def for_trained_model(self) -> "Runtime":
        """This runtime as a trained model runs in it (classifier.load) and as its unknown-image test is
        fitted (limits.fit_limits): the openvino engine for one image as for thousands (the converted
        graph is kept on disk), so every image gets the same numbers whichever way it comes in."""
        return dataclasses.replace(self, min_images=0) if self.engine == "openvino" else self

    def engine_for(self, images: int | None) -> str:
        """The engine `inference_model` picks for a run of `images` images (None: many)."""
        if self.engine == "openvino" and (images is None or images >= self.min_images):
            return "openvino"
        return "torch"

    def _torch_inference(self, m: nn.Module) -> nn.Module:
        try:
            m = fx_fuse(m, inplace=True)
        except Exception as e:  # a model that torch.fx cannot trace still runs, unfused
            log.debug("conv-bn folding skipped for %s: %s", type(m).__name__, e)
        for p in m.parameters():  # the folded convs' new parameters too
            p.requires_grad_(False)
        return self.prepare(m)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        return torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

    def describe(self) -> str:
        where = f"cpu ({cpu_class()})" if self.device.type == "cpu" else self.device.type
        ranks = f", {self.group.world} ranks" if self.group.active else ""
        return (f"{where} {self.precision} channels_last"
                f"{' compiled' if self.compile else ''}, {torch.get_num_threads()} threads{ranks}"
                f"{self._engine_note()}{', int8 features (NNCF)' if self.int8_features else ''}")

    def _engine_note(self) -> str:
        if self.engine != "openvino":
            return ""
        if self.min_images:
            return f", OpenVINO for inference of {self.min_images}+ images"
        return ", inference in OpenVINO"


class _ForwardFeatures(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def resolve_runtime(*, device: str = "auto", precision: str = "auto", threads: int | None = None,
                    compile: bool = False, engine: str = "auto", group: Group = SINGLE) -> Runtime:
    """Choose device, precision, memory format and inference engine ('auto' = the fastest that is
    numerically safe). In a data-parallel `group`: this rank's GPU, and the node's cores shared
    among its ranks unless `threads` says otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    int8 = precision == "int8"
    if int8:  # features in int8 (OpenVINO); the rest in what auto picks
        import importlib.util

        if (engine == "torch" or not openvino_available() or device not in ("auto", "cpu")
                or importlib.util.find_spec("nncf") is None):
            raise ValueError("precision int8 runs in OpenVINO on the CPU, quantized by NNCF: drop --engine torch / "
                             "--device, and pip install 'headstart[int8]' (openvino and nncf)")
        precision, device, engine = "auto", "cpu", "openvino"
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not one of {ENGINES}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if group.active and device.startswith("cuda"):
        device = f"cuda:{group.local_rank}"  # one GPU per rank
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N (headstart runs on CPUs and "
                         "CUDA GPUs)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
    if threads is None and group.active:
        threads = threads_per_rank(group)
    if threads is not None:
        if not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be 1 or more, got {threads!r}")
        torch.set_num_threads(threads)
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_bf16() else "fp32"
    if precision == "fp16" and dev.type == "cpu":
        log.warning("fp16 on a CPU is slow and loses precision; bf16 or fp32 is the better choice")
    if engine == "openvino":
        fix = "or use --engine torch"
        if dev.type != "cpu":
            raise ValueError(f"the openvino engine runs on the CPU, not {device!r}; use --device cpu {fix}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"the openvino engine runs fp32 or bf16, not {precision!r}; {fix}")
        if compile:
            raise ValueError(f"--compile is for the torch engine; drop it {fix}")
        if not openvino_available():
            raise ValueError(f"the openvino engine needs the openvino package: pip install openvino, {fix}")
    min_images = 0 if engine == "openvino" else MIN_IMAGES
    if engine == "auto":
        usable = dev.type == "cpu" and precision in ("fp32", "bf16") and not compile
        engine = "openvino" if usable and openvino_available() else "torch"
    return Runtime(dev, precision, compile=compile, engine=engine, min_images=MIN_IMAGES if int8 else min_images,
                   int8_features=int8, group=group)
