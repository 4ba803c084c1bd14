"""Fine-tune step speed of ResNet50 at batch 18, 224x224: plain fp32 NCHW eager vs headstart's path.

    python bench/train_step.py [--steps 11] [--no-rss]

The network is the one `headstart train DATA` fine-tunes: ResNet50 in the layout of its default
ImageNet weights (Keras's: the stride-2 in the first 1x1 conv of a stage), 2 classes. Each
configuration runs the same SGD step (forward, cross-entropy, backward, update) on the same
random batch; images/s is the median over --steps steps after 2 warm-up steps, the configurations
taking turns step by step (this machine is shared: load comes in bursts). The matmul peak is
measured in the same run: bf16 where the CPU runs it natively, else fp32 (an emulated bf16 matmul
would take minutes). Peak RSS is that of a child process fine-tuning for real on
hymenoptera (data loader included) at batch 18. Last line: finetune_speedup=<headstart / plain>.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import HYMENOPTERA, RESNET50_GFLOP_TRAIN, ROOT, compute_peak, cpu_line, machine, table

from headstart.data import Batch
from headstart.data.transforms import Preprocessing
from headstart.models import create_model, get_model_info
from headstart.models.kernels import kernels_available
from headstart.runtime.device import Runtime, resolve_runtime
from headstart.training import TrainConfig
from headstart.training.epochs import set_train_mode, train_one_epoch
from headstart.training.optim import Stepper

BATCH = 18


def plain_step(model, x, y, opt, *, channels_last=False, bf16=False):
    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return step


def headstart_step(model, images, labels, runtime: Runtime, pre: Preprocessing, *, kernels: bool = True):
    """One step through headstart's own training code (train_one_epoch over a one-batch 'loader');
    kernels=False: with HEADSTART_KERNELS=0, PyTorch's BatchNorm, ReLU and add instead of the fused kernel."""
    config = TrainConfig(arch="resnet50", weights=None, strategy="finetune")
    runtime.prepare(model)
    stepper = Stepper.build(list(model.parameters()), config, 1, runtime)
    batch = Batch(images, labels, torch.arange(len(labels)))

    def step():
        os.environ["HEADSTART_KERNELS"] = "1" if kernels else "0"
        try:
            set_train_mode(model)
            return train_one_epoch(model, [batch], stepper, runtime, pre, epoch=1)
        finally:
            os.environ.pop("HEADSTART_KERNELS")
    return step


# The main process's peak is VmHWM (this process image's high-water mark). ru_maxrss is not: Linux
# carries the parent's resident size into a child's ru_maxrss across exec (a child of a 3 GB Python
# process reported 2.95 GB on its first line, VmHWM 11 MB), and this benchmark's process holds three
# ResNet50s by then: it printed 4.14 GB for a run that peaked at 2.04 GB on its own.
RSS_CHILD = """
import re, sys, resource
sys.path.insert(0, {root!r})
from headstart.training import TrainConfig, train
train({data!r}, out={out!r}, config=TrainConfig(strategy="finetune", epochs=1, batch_size=18))
hwm = int(re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1))
print(hwm, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=11)
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child run")
    args = ap.parse_args()
    torch.manual_seed(0)
    layout = getattr(get_model_info("resnet50").weights["imagenet"], "model_kwargs", {})  # {"stride_in_1x1": True}
    base = create_model("resnet50", num_classes=2, **layout)
    pre = Preprocessing()
    images = torch.randint(0, 256, (BATCH, 3, 224, 224), dtype=torch.uint8)
    labels = torch.randint(0, 2, (BATCH,))
    x = ((images.float() / 255) - 0.45) / 0.225

    peak_kind, peak = compute_peak()
    rows, speeds = [], {}
    configs = {
        "plain fp32, NCHW, eager": lambda m: plain_step(m, x, labels, torch.optim.SGD(m.parameters(), 1e-3, 0.9)),
        "fp32 + channels_last": lambda m: plain_step(
            m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last), labels,
            torch.optim.SGD(m.parameters(), 1e-3, 0.9)),
        "headstart, fused kernels off": lambda m: headstart_step(m, images, labels, resolve_runtime(), pre,
                                                                 kernels=False),
        "headstart default (auto)": lambda m: headstart_step(m, images, labels, resolve_runtime(), pre),
    }
    # Interleaved: every round times one step of each configuration, so that a burst of load from
    # other tenants of this shared machine falls on all of them, not on whichever ran then.
    steps = {name: make(copy.deepcopy(base).train()) for name, make in configs.items()}
    for step in steps.values():
        for _ in range(2):  # warm-up
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t)
    speeds = {name: BATCH / statistics.median(ts) for name, ts in times.items()}
    plain = speeds["plain fp32, NCHW, eager"]
    round_ratios = [p / h for p, h in zip(times["plain fp32, NCHW, eager"], times["headstart default (auto)"])]
    for name, ips in speeds.items():
        rows.append([name, f"{ips:.2f}", f"{BATCH / ips:.2f}", f"{ips / plain:.2f}x",
                     f"{ips * RESNET50_GFLOP_TRAIN / peak:.1%}"])
    print(f"machine: {machine()}")
    print(cpu_line())
    print(f"{peak_kind} matmul peak measured now: {peak:.0f} GFLOP/s")
    print(f"network: resnet50 {layout}; headstart default runtime: {resolve_runtime().describe()}, fused "
          f"BatchNorm kernels {'on' if kernels_available() else 'unavailable'}")
    print(table(rows, ["configuration (ResNet50, batch 18, 224)", "img/s", "s/step", "vs plain fp32",
                       f"of {peak_kind} peak"]))
    if not args.no_rss:
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            code = RSS_CHILD.format(root=str(ROOT), data=str(HYMENOPTERA), out=tmp + "/run")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        main_kb, worker_kb = map(int, out.stdout.strip().splitlines()[-1].split())
        print(f"peak RSS of a 1-epoch fine-tune on hymenoptera at batch 18 (headstart train, 2 workers): "
              f"main process {main_kb / 1024**2:.2f} GB, largest worker {worker_kb / 1024**2:.2f} GB "
              f"(a worker's counts the pages it shares with the main process, forked from it)")
    print(f"per-round speedups (plain step time / headstart step time, same round): "
          f"{', '.join(f'{r:.2f}' for r in round_ratios)}; their median {statistics.median(round_ratios):.2f}")
    print(f"finetune_speedup={speeds['headstart default (auto)'] / plain:.2f}")


if __name__ == "__main__":
    main()
