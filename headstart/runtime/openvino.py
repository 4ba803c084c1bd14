"""OpenVINO as the inference engine on x86 CPUs: the same network, converted once per run.

Eager PyTorch runs a ResNet50 forward pass one op at a time; OpenVINO's CPU plugin compiles the
whole graph with its convolutions fused with their BatchNorm, ReLU and residual add, and picks the
AMX bf16 kernels itself. Measured here (2 cores, AMX-BF16, batch 32, ResNet50 at 224x224): about 95
img/s against 45 for headstart's eager bf16 path (conv-bn folded, channels_last), one batch at a
time; 92-101 img/s against 64 for that one-at-a-time way with 2 workers decoding beside it, when
batches are pipelined over two streams (see `OpenVINOModel`). The conversion costs about 0.75 s
for ResNet50 on a quiet machine (trace 0.19 s, convert 0.19 s, save 0.09 s, compile 0.26 s), so it
pays only past some number of images: `Runtime.inference_model` uses it for at least `MIN_IMAGES`.

The conversion goes through OpenVINO's PyTorch frontend directly. Importing `openvino` also imports
its model-conversion tools, which send a usage event to Intel unless the user has opted out;
headstart hides the `openvino_telemetry` module before that import, so it never sends anything.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import importlib.util
import inspect
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

import torch
from torch import nn

from headstart.io.download import cache_dir
from headstart.io.weights import weights_fingerprint

log = logging.getLogger(__name__)

CACHE_ENTRIES = 4  # converted graphs kept under <cache_dir()>/openvino/ (ResNet50: about 100 MB each)
# Where the conversion (0.7-1.1 s) pays back, measured here at batch 32 against the eager bf16 path:
# ResNet50 after about 90 images (50 vs 135 img/s), EfficientNet-Lite0 after 220 (137 vs 379),
# MobileNetV2 after 275 (219 vs 487).
MIN_IMAGES = 256
_PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
T = TypeVar("T")


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
def openvino_core():
    ov = import_openvino()[0]
    with _keep_sigaltstack():
        core = ov.Core()
        core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")  # starts the CPU plugin
    return core


def import_openvino():
    # its import -> ImportError, for OpenVINO's conversion tools and NNCF alike (unless imported already)
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
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
    ov = import_openvino()[0]
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


def convert_to_openvino(model: nn.Module, example: torch.Tensor) -> object:
    """An OpenVINO graph of `model` (in eval mode) for inputs shaped like `example` but for the batch
    size, which stays open; through the PyTorch frontend, with no telemetry (see the module docstring)."""
    ov, FrontEndManager, TorchScriptPythonDecoder, _ = import_openvino()
    # The trace bakes in shapes (TF-style padding amounts...): hence one graph per input (C, H, W).
    with torch.no_grad(), torch.autocast("cpu", enabled=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # about exactly that
        # check_trace=False: torch's check traces the model a second time (0.7 of 1.2 s for ResNet50)
        # Traced through a module that does not own `model`: its tensors enter the trace as
        # constants, and torch makes no scripted copy of each of its 151 submodules (ResNet50:
        # trace 0.19 s instead of 0.30, conversion 0.19 s instead of 0.24, same graph).
        decoder = TorchScriptPythonDecoder(_Unowned(model), example_input=(example,), shared_memory=True,
                                           trace_kwargs={"check_trace": False})
        frontend = FrontEndManager().load_by_framework("pytorch")
        graph = frontend.convert(frontend.load(decoder))
    graph.reshape({graph.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})  # any batch size
    return graph


def quantize_int8(graph: object, inputs: Iterable[object]) -> object:
    """`graph` (an OpenVINO model) with int8 weights and activations: NNCF's post-training
    quantization, the activations' ranges measured on `inputs` (one image each, as the graph takes
    them; a few hundred: NNCF's default is 300). Needs the `nncf` package (`pip install
    'headstart[int8]'`), imported after OpenVINO, so without its telemetry too."""
    import_openvino()
    try:
        import nncf
    except ImportError:
        raise ModuleNotFoundError("int8 needs NNCF (OpenVINO's quantization tools): pip install 'headstart[int8]' "
                                  "(or pip install nncf)") from None
    nncf_log = logging.getLogger("nncf")  # NNCF logs on stdout: its records go to the caller's logging instead
    for handler in list(nncf_log.handlers):
        nncf_log.removeHandler(handler)
    nncf_log.propagate = True
    data = list(inputs)
    if not data:
        raise ValueError("int8 quantization needs calibration images; none could be read")
    bars = io.StringIO()  # and draws progress bars there
    with warnings.catch_warnings(), contextlib.redirect_stdout(bars), contextlib.redirect_stderr(bars):
        warnings.simplefilter("ignore")
        quantized = nncf.quantize(graph, nncf.Dataset(data), subset_size=len(data),
                                  preset=nncf.QuantizationPreset.PERFORMANCE)
    log.debug("NNCF's progress: %s", bars.getvalue().strip())
    return quantized


def _prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used entries of the graph cache."""
    entries = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[keep:]:
        shutil.rmtree(old, ignore_errors=True)


class _Unowned(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self._model = (model,)  # a tuple: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._model[0](x)


class OpenVINOModel(nn.Module):
    """Callable like the eval-mode `model` it wraps: float (N, C, H, W) -> float32 outputs; `pipeline`
    runs a stream of batches with several in flight.

    The graph is converted on the first call, for that call's (C, H, W) with any batch size, and
    kept on disk (keyed by `graph_key`; the `CACHE_ENTRIES` most recently used are kept), so a
    later run with the same network reads it instead of converting it again; `keep=False` (for
    weights that are about to change) neither reads nor writes that cache. If OpenVINO cannot
    convert the network, the torch module from `fallback()` runs instead (logged once).

    It compiles for throughput: one stream per thread here (2 on 2 threads), each running its own
    requests on its own thread, with no barrier between them after every layer. A batch is split
    into one chunk per stream, and `pipeline` keeps two chunks per stream queued, so a stream never
    waits while the data loader or the caller takes a core. ResNet50 bf16, hymenoptera's 398 images
    decoded by 2 workers, the ways taking turns 4 times: 92-101 img/s against 64 for one request
    at a time with every thread on each batch (OpenVINO's latency mode)."""

    def __init__(self, model: nn.Module, *, precision: str, threads: int,
                 fallback: Callable[[], nn.Module], keep: bool = True,
                 calibration: Callable[[], list[torch.Tensor]] | None = None) -> None:
        super().__init__()
        if precision not in _PRECISIONS:
            raise ValueError(f"OpenVINO runs fp32 or bf16 (and int8 with calibration), not {precision!r}; use "
                             "--engine torch")
        self._model = (model,)  # a tuple: not registered as a submodule, but kept alive (shared weights)
        self._precision, self._threads, self._fallback, self._keep = precision, threads, fallback, keep
        self._calibration = calibration  # given: the graph is quantized to int8 on these inputs (not kept)
        self._requests: dict[tuple[int, ...], list[object]] = {}  # per input (C, H, W): its idle requests
        self._streams = 1
        self._torch: nn.Module | None = None

    @property
    def streams(self) -> int:
        """OpenVINO's streams (one per thread once compiled; 1 before)."""
        return self._streams

    @property
    def fell_back(self) -> bool:
        """True once OpenVINO could not convert the network and PyTorch runs it instead."""
        return self._torch is not None

    @property
    def compiled_shapes(self) -> list[tuple[int, ...]]:
        """The input (C, H, W) shapes compiled so far."""
        return list(self._requests)

    @property
    def in_flight(self) -> int:
        """Requests started and not yet taken back (0 whenever no `pipeline` is running)."""
        return sum(2 * self._streams - len(idle) for idle in self._requests.values())

    def _convert(self, x: torch.Tensor) -> object:
        ov, _, _, PrePostProcessor = import_openvino()
        graph = convert_to_openvino(self._model[0], x[:1].float().contiguous())
        # Fed NHWC: Runtime.inputs gives channels_last batches, so no copy back to NCHW (the layout
        # change goes into the first convolution; ResNet50 at batch 32: 282 vs 339 ms a batch here).
        ppp = PrePostProcessor(graph)
        ppp.input().tensor().set_layout(ov.Layout("NHWC"))
        ppp.input().model().set_layout(ov.Layout("NCHW"))
        graph = ppp.build()
        if self._calibration is not None:
            start = time.perf_counter()
            inputs = [t.float().permute(0, 2, 3, 1).contiguous().numpy() for t in self._calibration()]
            graph = quantize_int8(graph, inputs)
            log.info("OpenVINO: %s quantized to int8 on %d images in %.1fs", type(self._model[0]).__name__,
                     len(inputs), time.perf_counter() - start)
        return graph

    def _graph(self, x: torch.Tensor) -> tuple[object, str]:
        """The converted graph for x's (C, H, W): from the disk cache, else converted and kept there."""
        if not self._keep or self._calibration is not None:
            return self._convert(x), "converted"
        root = cache_dir() / "openvino"
        folder = root / graph_key(self._model[0], tuple(x.shape[1:]))
        xml = folder / "model.xml"
        if xml.exists():
            try:
                graph = openvino_core().read_model(str(xml))
                os.utime(folder)  # recently used
                return graph, f"read from {folder}"
            except Exception as e:  # a damaged entry: convert again, replace it
                log.warning("ignoring the unreadable converted graph %s: %s", folder, e)
                shutil.rmtree(folder, ignore_errors=True)
        graph = self._convert(x)
        ov = import_openvino()[0]
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

    def _compile(self, x: torch.Tensor) -> list[object]:
        start = time.perf_counter()
        graph, how = self._graph(x)
        with _keep_sigaltstack():
            compiled = openvino_core().compile_model(graph, "CPU", {
                "PERFORMANCE_HINT": "THROUGHPUT",  # streams that each run whole requests (see the class)
                "INFERENCE_NUM_THREADS": self._threads,
                "INFERENCE_PRECISION_HINT": _PRECISIONS[self._precision],
            })
        self._streams = int(compiled.get_property("NUM_STREAMS"))
        log.info("OpenVINO: %s %s and compiled for %s inputs (%s, %d streams) in %.1fs", type(self._model[0]).__name__,
                 how, tuple(x.shape[1:]), self._precision, self._streams, time.perf_counter() - start)
        return [compiled.create_infer_request() for _ in range(2 * self._streams)]

    def _idle(self, x: torch.Tensor) -> list[object] | None:
        """The idle requests for x's (C, H, W), compiling on first sight; None once fallen back to torch."""
        shape = tuple(x.shape[1:])
        if self._torch is None and shape not in self._requests:
            try:
                self._requests[shape] = self._compile(x)
            except Exception as e:
                if self._calibration is not None:  # int8 asked for: no silent fp32 in its place
                    raise
                log.warning("OpenVINO could not convert %s (%s: %s); running it in PyTorch",
                            type(self._model[0]).__name__, type(e).__name__, str(e).splitlines()[0][:200])
                self._torch = self._fallback()
        return None if self._torch is not None else self._requests[shape]

    def pipeline(self, batches: Iterable[tuple[T, torch.Tensor]]) -> Iterator[tuple[T, torch.Tensor]]:
        """(tag, float32 outputs) for each (tag, float (N, C, H, W) batch), in order, with up to two
        chunks per stream queued in OpenVINO while the next batch is read from `batches`."""
        flight: collections.deque = collections.deque()  # (request, its idle list, its input, batch record)
        done: collections.deque = collections.deque()  # [tag, chunks expected, outputs so far], in order

        def finish_oldest() -> None:
            request, idle, _, record = flight.popleft()
            request.wait()
            record[2].append(torch.from_numpy(request.get_output_tensor(0).data.copy()))  # buffer is reused
            idle.append(request)

        def ready() -> Iterator[tuple[T, torch.Tensor]]:
            while done and len(done[0][2]) == done[0][1]:
                tag, _, outs = done.popleft()
                yield tag, torch.cat(outs)

        try:
            for tag, x in batches:
                idle = self._idle(x)
                if idle is None:  # PyTorch, after a failed conversion
                    while flight:
                        finish_oldest()
                    yield from ready()
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._precision == "bf16"):
                        out = self._torch(x).float()
                    yield tag, out
                    continue
                # NHWC: no copy when x is channels_last (as Runtime.inputs gives it)
                batch = x.float().permute(0, 2, 3, 1).contiguous().numpy()
                size = -(-len(batch) // self._streams)  # one chunk per stream
                record = [tag, -(-len(batch) // size), []]
                done.append(record)
                for start in range(0, len(batch), size):
                    while not idle:
                        finish_oldest()
                    request, chunk = idle.pop(), batch[start:start + size]
                    request.start_async({0: chunk}, share_inputs=True)  # reads `chunk` in place, kept in `flight`
                    flight.append((request, idle, chunk, record))
                yield from ready()
            while flight:
                finish_oldest()
            yield from ready()
        finally:  # `batches` raised, or the caller stopped early: let OpenVINO finish reading the inputs
            for request, idle, _, _ in flight:
                request.wait()
                idle.append(request)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        [(_, out)] = self.pipeline([(None, x)])
        return out
