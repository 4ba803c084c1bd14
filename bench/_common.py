"""Shared helpers for the benchmarks: timing, the machine's matmul peak, tables."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
sys.path.insert(0, str(ROOT))

RESNET50_GFLOP_FORWARD = 8.2  # per 224x224 image
RESNET50_GFLOP_TRAIN = 24.3  # per image, forward + backward


def median_time(fn: Callable[[], object], *, warmup: int = 2, repeat: int = 5) -> float:
    """Median seconds of fn() after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    """Measured GFLOP/s of an n x n x n matmul on this machine, now (same run as the benchmark)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = median_time(lambda: a @ b, warmup=3, repeat=7)
    return 2 * n**3 / t / 1e9


def compute_peak() -> tuple[str, float]:
    """("bf16" or "fp32", measured matmul GFLOP/s): bf16 only where the CPU (as oneDNN may use it)
    runs it natively; emulated bf16 would take minutes and mean nothing."""
    from headstart.runtime.device import cpu_has_bf16

    dtype = "bf16" if cpu_has_bf16() else "fp32"
    return dtype, matmul_peak_gflops(torch.bfloat16 if dtype == "bf16" else torch.float32)


def cpu_line() -> str:
    """The CPU class these figures hold for, and the settings that cap it (to measure the AVX2
    class on an AVX-512 machine: ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2)."""
    from headstart.runtime.device import cpu_class

    caps = [f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if os.environ.get(k)]
    return f"CPU class: {cpu_class()}" + (f" (capped: {' '.join(caps)})" if caps else "") + \
        f"; torch's kernels: {torch.backends.cpu.get_cpu_capability()}"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {platform.python_version()}"


def table(rows: list[list[object]], header: list[str]) -> str:
    cells = [[str(c) for c in r] for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def plain_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, train_loader, val_loader, pre,
                set_train_mode: Callable[[], None]) -> float:
    """One epoch of a plain loop as a user writes it (fp32, NCHW, eager): SGD steps on the train
    loader's batches after `set_train_mode()`, then the validation accuracy in eval mode."""
    import torch.nn.functional as F

    from headstart.data.transforms import normalize

    set_train_mode()
    for b in train_loader:
        loss = F.cross_entropy(model(normalize(b.images, pre)), b.labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct = n = 0
    with torch.no_grad():
        for b in val_loader:
            correct += int((model(normalize(b.images, pre)).argmax(1) == b.labels).sum())
            n += len(b)
    return correct / n
