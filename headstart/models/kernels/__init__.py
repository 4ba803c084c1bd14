"""Fused CPU kernels for training, built on first use with the machine's C compiler.

One so far, `batch_norm_act`: a BatchNorm in training mode together with the activation (ReLU or
ReLU6) and the residual add that follow it, for bf16 channels_last activations (bn_act.c). PyTorch
runs these as three or four separate ops, each a pass over memory, and its bf16 channels_last
BatchNorm kernels run well below this machine's memory bandwidth. Fused, ResNet50's largest
BatchNorm + ReLU, (18, 256, 56, 56), takes about 15 ms forward and backward instead of about 34,
and a ResNet50 fine-tune step at batch 18 about 0.83 s instead of 0.93 (bench/RESULTS.md).

The library is compiled with `$CC` (default `cc`) and `-O3 -march=native -fopenmp` into
`cache_dir()/kernels/`, named by a hash of the source, the flags and the CPU's feature flags (so a
home directory shared by different machines never loads code built for another CPU); building
takes about half a second, once. Where there is no compiler, the build fails, or
HEADSTART_KERNELS=0 is set, `batch_norm_act` runs PyTorch's own modules, and the log says why once.
Results agree with PyTorch's to bf16 rounding (tests/test_kernels.py); the fused forward rounds
once where PyTorch rounds after the BatchNorm and again after the add.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from headstart.io.download import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("bn_act.c")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
LIBS = ("-lm",)
_CL = torch.channels_last
ACTIVATIONS = {None: 0, "relu": 1, "relu6": 2}  # bn_act.c's codes


def _cpu_flags() -> str:
    """The CPU's feature flags (Linux), else the machine name: part of the library's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.machine()


def _build(compiler: str) -> Path:
    """Compile bn_act.c unless a library for this source, these flags and this CPU is cached."""
    key = hashlib.sha256(SOURCE.read_bytes() + repr(CFLAGS + LIBS).encode() + _cpu_flags().encode())
    lib = cache_dir() / "kernels" / f"bn_act-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    # The compiler writes the file itself, so download.atomic_write (a file object) does not fit:
    # it writes a temporary name beside the library, renamed into place when complete.
    fd, tmp = tempfile.mkstemp(prefix=f".{lib.name}.", suffix=".tmp", dir=lib.parent)
    os.close(fd)
    start = time.perf_counter()
    try:
        done = subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", tmp, *LIBS], capture_output=True,
                              text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same bytes
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.debug("built the fused BatchNorm kernels in %.2fs: %s", time.perf_counter() - start, lib)
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        log.info("fused BatchNorm kernels off: no C compiler (%r) on PATH; PyTorch's ops run instead "
                 "(set CC to a compiler to build them)", compiler)
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        log.info("fused BatchNorm kernels off (%s); PyTorch's ops run instead", e)
        return None
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    lib.hs_bn_act_forward.argtypes = [p, p, p, i64, i64, p, p, p, p, f64, f64, i32, p, p, i32]
    lib.hs_bn_act_forward.restype = i32
    lib.hs_bn_act_backward.argtypes = [p, p, p, p, p, i64, i64, p, p, p, i32, p, p, i32]
    lib.hs_bn_act_backward.restype = i32
    return lib


def kernels_available() -> bool:
    """True when the fused kernels are built (or can be) and HEADSTART_KERNELS is not 0."""
    return os.environ.get("HEADSTART_KERNELS", "1") != "0" and _library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _BatchNormAct(torch.autograd.Function):
    """act(batch_norm(x) + residual?) over (N, C, H, W) bf16 channels_last tensors; weight, bias
    and the running statistics are fp32 (C,). Saves x, y (with an activation), mean and 1/std: as
    much as PyTorch's BatchNorm + in-place activation save."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None,
                running_mean: torch.Tensor, running_var: torch.Tensor, momentum: float, eps: float,
                act: int) -> torch.Tensor:
        n, c, h, w = x.shape
        y = torch.empty_like(x, memory_format=_CL)
        mean, invstd = torch.empty(c), torch.empty(c)
        if _library().hs_bn_act_forward(
                x.data_ptr(), _ptr(residual), y.data_ptr(), n * h * w, c, weight.data_ptr(), bias.data_ptr(),
                running_mean.data_ptr(), running_var.data_ptr(), momentum, eps, act, mean.data_ptr(),
                invstd.data_ptr(), torch.get_num_threads()):
            raise MemoryError("batch_norm_act: out of memory for its per-channel sums")
        ctx.act, ctx.has_residual = act, residual is not None
        ctx.save_for_backward(x, y if act else None, weight, mean, invstd)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, y, weight, mean, invstd = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = dy.to(x.dtype).contiguous(memory_format=_CL)  # e.g. the pool's backward hands over a broadcast
        need_x, need_res = ctx.needs_input_grad[0], ctx.has_residual and ctx.needs_input_grad[3]
        dx = torch.empty_like(x, memory_format=_CL) if need_x else None
        dres = torch.empty_like(x, memory_format=_CL) if need_res else None
        dweight, dbias = torch.empty_like(weight), torch.empty_like(weight)
        if _library().hs_bn_act_backward(
                dy.data_ptr(), _ptr(y), x.data_ptr(), _ptr(dx), _ptr(dres), n * h * w, c, weight.data_ptr(),
                mean.data_ptr(), invstd.data_ptr(), ctx.act, dweight.data_ptr(), dbias.data_ptr(),
                torch.get_num_threads()):
            raise MemoryError("batch_norm_act: out of memory for its per-channel sums")
        return dx, dweight, dbias, dres, None, None, None, None, None


def _fusable(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False  # traced graphs want the standard modules (BatchNorm folding, export)
    if not (bn.training and bn.affine and bn.track_running_stats and bn.running_mean is not None):
        return False
    if type(bn) is not nn.BatchNorm2d:  # a subclass has statistics of its own (distributed.SyncBatchNorm)
        return False
    ok = (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() == 4 and x.numel() > 0
          and x.shape[0] * x.shape[2] * x.shape[3] > 1  # PyTorch raises for a single value per channel
          and x.is_contiguous(memory_format=_CL)
          and all(t.dtype == torch.float32 and t.is_contiguous()
                  for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)))
    if ok and residual is not None:
        ok = residual.shape == x.shape and residual.dtype == x.dtype and residual.device == x.device
    return ok and kernels_available()


def batch_norm_act(bn: nn.BatchNorm2d, x: torch.Tensor, *, act: str | None = None,
                   residual: torch.Tensor | None = None) -> torch.Tensor:
    """`act(bn(x) + residual)` (act: None, "relu" or "relu6"; residual optional), as one fused
    kernel pass each way when training on bf16 channels_last activations (see the module
    docstring), else with PyTorch's modules.

    bn: the block's nn.BatchNorm2d (its running statistics and num_batches_tracked update as
    nn.BatchNorm2d's would); x, residual: (N, C, H, W). Traced models (torch.fx, torch.jit,
    torch.compile) see `bn(x)`, the add and an in-place activation, so BatchNorm still folds into
    the conv before it for inference.
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not one of {list(ACTIVATIONS)}")
    if not _fusable(bn, x, residual):
        y = bn(x)
        if residual is not None:
            y = y + residual
        if act == "relu":
            return F.relu(y, inplace=True)
        return F.relu6(y, inplace=True) if act == "relu6" else y
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)  # None: average
    if residual is not None:
        residual = residual.contiguous(memory_format=_CL)
    return _BatchNormAct.apply(x, bn.weight, bn.bias, residual, bn.running_mean, bn.running_var, momentum, bn.eps,
                               ACTIVATIONS[act])
