"""OpenVINO as the inference engine on x86 CPUs: the same network, converted once per run.

Eager PyTorch runs a ResNet50 forward pass one op at a time; OpenVINO's CPU plugin compiles the
whole graph with its convolutions fused with their BatchNorm, ReLU and residual add, and picks the
AMX bf16 kernels itself. Measured here (2 cores, AMX-BF16, batch 32, ResNet50 at 224x224): about 95
img/s against 45 for headstart's eager bf16 path (conv-bn folded, channels_last). The conversion
costs about 1.1 s for ResNet50 (trace 0.6 s, convert 0.3 s, compile 0.25 s), so it pays only past
some number of images: `Runtime.inference_model` uses it for at least `MIN_IMAGES` images.

The conversion goes through OpenVINO's PyTorch frontend directly. Importing `openvino` also imports
its model-conversion tools, which send a usage event to Intel unless the user has opted out;
headstart hides the `openvino_telemetry` module before that import, so it never sends anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from .download import cache_dir
from .weights import weights_fingerprint

log = logging.getLogger(__name__)

CACHE_ENTRIES = 4  # converted graphs kept under <cache_dir()>/openvino/ (ResNet50: about 100 MB each)
# ResNet50 saves about 12 ms per image, so its 1.1 s of conversion pays after about 100 images; the
# lighter backbones save less per image (their eager pass is 2-3x cheaper) for a similar conversion.
MIN_IMAGES = 256
_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}


def openvino_available() -> bool:
    """True when the `openvino` package is installed (a dependency on x86-64); it is imported on
    the first conversion, and a broken install falls back to PyTorch there."""
    return importlib.util.find_spec("openvino") is not None


class _StackT(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


@contextlib.contextmanager
def _keep_sigaltstack() -> Iterator[None]:
    """Put back the calling thread's signal stack after OpenVINO's CPU plugin starts.

    The plugin's start sets a 20 KB signal stack on the calling thread and installs no handler
    that uses it; Python's handlers (SA_ONSTACK), such as the SIGCHLD handler of the data loader's
    workers, then run on that stack, and a later run of the tests died of a kernel-sent SIGSEGV
    (si_code SI_KERNEL) in a SIGCHLD after the plugin's objects were gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        saved = _StackT()
        if libc.sigaltstack(None, ctypes.byref(saved)) != 0:
            raise OSError(ctypes.get_errno(), "sigaltstack")
    except (OSError, AttributeError):  # not Linux/glibc: nothing to keep
        yield
        return
    try:
        yield
    finally:
        libc.sigaltstack(ctypes.byref(saved), None)


@functools.cache
def _core():
    ov = _import_openvino()[0]
    with _keep_sigaltstack():
        core = ov.Core()
        core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")  # starts the CPU plugin
    return core


def _import_openvino():
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]  # its import -> ImportError
    import openvino
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder
    from openvino.preprocess import PrePostProcessor
    return openvino, FrontEndManager, TorchScriptPythonDecoder, PrePostProcessor


def graph_key(model: nn.Module, shape: tuple[int, ...]) -> str:
    """What a converted graph depends on: the input's (C, H, W), the module tree with every layer's
    settings (its repr), options and mode, the source of every class in it, every tensor, and the
    versions of openvino and torch (ResNet50: about 0.12 s, mostly hashing the weights)."""
    h = hashlib.sha256()
    ov = _import_openvino()[0]
    h.update(json.dumps({"shape": shape, "input": "NHWC", "openvino": ov.__version__,
                         "torch": torch.__version__}).encode())
    h.update(repr(model).encode())
    h.update(bytes(m.training for m in model.modules()))  # eval vs train mode (BatchNorm, dropout)
    for m in model.modules():
        h.update(json.dumps(getattr(m, "arch_kwargs", None), sort_keys=True, default=str).encode())
    for path in sorted({inspect.getsourcefile(type(m)) or "" for m in model.modules()} - {""}):
        h.update(Path(path).read_bytes())
    h.update(weights_fingerprint(model, exclude=None).encode())
    return h.hexdigest()[:32]


def _prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used entries of the graph cache."""
    entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


class OpenVINOModel(nn.Module):
    """Callable like the eval-mode `model` it wraps: float (N, C, H, W) -> float32 outputs.

    The graph is converted on the first call, for that call's (C, H, W) with any batch size, and
    kept on disk (keyed by `graph_key`; the `CACHE_ENTRIES` most recently used are kept), so a
    later run with the same network reads it instead of converting it again; `keep=False` (for
    weights that are about to change) neither reads nor writes that cache. If OpenVINO cannot
    convert the network, the torch module from `fallback()` runs instead (logged once)."""

    def __init__(self, model: nn.Module, *, precision: str, threads: int,
                 fallback: Callable[[], nn.Module], keep: bool = True) -> None:
        super().__init__()
        if precision not in _PRECISIONS:
            raise ValueError(f"OpenVINO runs fp32 or bf16, not {precision!r}; use --engine torch")
        self._model = (model,)  # a tuple: not registered as a submodule, but kept alive (shared weights)
        self._precision, self._threads, self._fallback, self._keep = precision, threads, fallback, keep
        self._compiled: dict[tuple[int, ...], object] = {}
        self._torch: nn.Module | None = None

    def _convert(self, x: torch.Tensor) -> object:
        ov, FrontEndManager, TorchScriptPythonDecoder, PrePostProcessor = _import_openvino()
        model = self._model[0]
        # The trace bakes in shapes (TF-style padding amounts...): hence one compiled graph per (C, H, W).
        with torch.no_grad(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)  # about exactly that
            # check_trace=False: torch's check traces the model a second time (0.7 of 1.2 s for ResNet50)
            decoder = TorchScriptPythonDecoder(model, example_input=(x[:1].float().contiguous(),),
                                               shared_memory=True, trace_kwargs={"check_trace": False})
            frontend = FrontEndManager().load_by_framework("pytorch")
            graph = frontend.convert(frontend.load(decoder))
        graph.reshape({graph.inputs[0]: ov.PartialShape([-1, *x.shape[1:]])})  # any batch size
        # Fed NHWC: Runtime.inputs gives channels_last batches, so no copy back to NCHW (the layout
        # change goes into the first convolution; ResNet50 at batch 32: 282 vs 339 ms a batch here).
        ppp = PrePostProcessor(graph)
        ppp.input().tensor().set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        return ppp.build()

    def _graph(self, x: torch.Tensor) -> tuple[object, str]:
        """The converted graph for x's (C, H, W): from the disk cache, else converted and kept there."""
        if not self._keep:
            return self._convert(x), "converted"
        root = cache_dir() / "openvino"
        folder = root / graph_key(self._model[0], tuple(x.shape[1:]))
        xml = folder / "model.xml"
        if xml.exists():
            try:
                graph = _core().read_model(str(xml))
                os.utime(folder)  # recently used
                return graph, f"read from {folder}"
            except Exception as e:  # a damaged entry: convert again, replace it
                log.warning("ignoring the unreadable converted graph %s: %s", folder, e)
                shutil.rmtree(folder, ignore_errors=True)
        graph = self._convert(x)
        ov = _import_openvino()[0]
        tmp = None
        try:
            root.mkdir(exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
            ov.save_model(graph, str(tmp / "model.xml"), compress_to_fp16=False)  # fp32 weights, as given
            tmp.rename(folder)  # whole entries only: a reader never sees a half-written one
            _prune(root, CACHE_ENTRIES)
        except OSError as e:  # a full or read-only disk, or another process kept it first
            log.warning("could not keep the converted graph in %s: %s", root, e)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        return graph, "converted"

    def _compile(self, x: torch.Tensor) -> object:
        start = time.perf_counter()
        graph, how = self._graph(x)
        with _keep_sigaltstack():
            compiled = _core().compile_model(graph, "CPU", {
                "PERFORMANCE_HINT": "LATENCY",  # one stream: each batch uses every thread
                "INFERENCE_NUM_THREADS": self._threads,
                "INFERENCE_PRECISION_HINT": _PRECISIONS[self._precision],
            })
        log.info("OpenVINO: %s %s and compiled for %s inputs (%s) in %.1fs", type(self._model[0]).__name__,
                 how, tuple(x.shape[1:]), self._precision, time.perf_counter() - start)
        return compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._torch is not None:
            return self._torch(x)
        shape = tuple(x.shape[1:])
        if shape not in self._compiled:
            try:
                self._compiled[shape] = self._compile(x)
            except Exception as e:
                log.warning("OpenVINO could not convert %s (%s: %s); running it in PyTorch",
                            type(self._model[0]).__name__, type(e).__name__, str(e).splitlines()[0][:200])
                self._torch = self._fallback()
                return self._torch(x)
        request = self._compiled[shape]
        batch = x.float().permute(0, 2, 3, 1).contiguous().numpy()  # NHWC: no copy if x is channels_last
        # (`batch` stays alive until infer returns, so OpenVINO may read it in place)
        out = request.infer({0: batch}, share_inputs=True)[0]  # (N, ...) float32
        return torch.from_numpy(out.copy())  # the request's buffer is reused by the next call
