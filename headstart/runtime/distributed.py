"""Data-parallel training on torch.distributed, as torchrun launches it.

    torchrun --nproc-per-node 2 -m headstart train DATA ...    # or: headstart train DATA --nproc 2

torchrun starts one process (a rank) per --nproc-per-node on each node, with RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `join` makes them one `Group`
(gloo on CPUs, nccl on CUDA, one GPU per rank). A run then does what one process would, within
fp32 rounding:
- the images: one seeded order per epoch, cut into global batches of --batch-size; rank r reads
  every world-th image of each (data.EpochBatches), and augmentation is seeded per (seed, epoch,
  image), so no image depends on the rank or the data-loader worker that reads it;
- the step: each rank's loss is its images' summed loss over the whole batch's count, times the
  world size (DistributedDataParallel averages the gradients over ranks): one process's step on
  the global batch;
- BatchNorm: the layers that train normalise with the statistics of the global batch
  (`SyncBatchNorm`), as one process does;
- validation and the frozen backbone's features: each rank runs its share, gathered in order;
- decisions (a Ctrl-C, the budget, auto's plan) are the group's: rank 0's, or any rank's stop.
Only rank 0 touches the run folder (checkpoints, run state, metrics.csv, pictures, report) and
prints; on --resume it reads the run state and sends it to the others.

A rank that dies makes the others' next collective fail at once (its sockets close), one that hangs
after `timeout` seconds (--timeout); they end with `RankLost`, which says how to resume.
"""

from __future__ import annotations

import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TypeVar

import torch
from torch import nn

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Group:
    """This process's place in a data-parallel run; the default is one process alone, whose
    collectives return their input."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1  # ranks on this node
    # (Group's own collectives send CPU tensors, over gloo; DDP's and SyncBatchNorm's live where the model does)

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes the run folder and prints."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one rank: collectives talk to the others."""
        return self.world > 1

    def leave(self) -> None:
        """Close this rank's process group (a rank that has finished: its gloo threads end now, not
        in the interpreter's exit, where they could abort the process)."""
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def sum(self, values: Sequence[float]) -> list[float]:
        """Each value summed over the ranks (float64)."""
        if not self.active:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a stop asked for on any rank stops them all)."""
        return self.sum([float(flag)])[0] > 0 if self.active else bool(flag)

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj`, on every rank (pickled over the group: tensors, dataclasses, JSON)."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def gather_rows(self, indices: torch.Tensor, tensors: Sequence[torch.Tensor],
                    failed: list[tuple[int, str]]) -> tuple[torch.Tensor, list[torch.Tensor], list[tuple[int, str]]]:
        """Every rank's rows of `tensors` (row i belongs to dataset position indices[i]), on every
        rank, in the order of their positions (one process's order), with every rank's `failed`."""
        if not self.active:
            return indices, list(tensors), failed
        parts = self.gather((indices.cpu(), [t.cpu() for t in tensors], failed))
        failed = sorted({tuple(f) for p in parts for f in p[2]})
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return indices, list(tensors), failed
        found = torch.cat([p[0] for p in parts])
        order = found.argsort()
        rows = [torch.cat([p[1][k] for p in parts])[order] for k in range(len(tensors))]
        return found[order], rows, failed

    def wrap(self, module: nn.Module, *, sync: bool = True) -> nn.Module:
        """`module` as DistributedDataParallel, its BatchNorm layers synchronised over the group
        (`sync`; else each rank's use its own images and DDP sends rank 0's buffers before each
        forward); DDP's constructor sends rank 0's parameters and buffers to every rank."""
        if not self.active:
            return module
        device = next(module.parameters()).device
        ddp = nn.parallel.DistributedDataParallel
        options: dict[str, Any] = {}
        if sync:
            sync_batchnorm(module)
            # Buffers are the same on every rank (SyncBatchNorm's statistics): no broadcast before each
            # forward (torch 2.13 renamed the option; older ones know the old name only).
            options = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                       else {"broadcast_buffers": False})
        return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True,
                   **options)


SINGLE = Group()
_joined: Group | None = None


def launched() -> bool:
    """Whether torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank as its launcher set it (0 when alone)."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def join(*, timeout: float, device: str = "auto") -> Group:
    """This process's Group: alone, or (under torchrun) the group of WORLD_SIZE ranks, joined once
    per process with gloo (CPU) or nccl (`device` cuda). `timeout`: seconds a collective waits for
    the other ranks before it fails."""
    global _joined
    if not launched():
        return SINGLE
    if _joined is not None:
        return _joined
    env = os.environ
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank, local_world = int(env.get("LOCAL_RANK", 0)), int(env.get("LOCAL_WORLD_SIZE", 1))
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"rank {rank} is local rank {local_rank} but this machine has {torch.cuda.device_count()} "
                             "GPU(s): one GPU per rank; pass --nproc (--nproc-per-node) of at most that many")
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():  # gloo for CPU tensors (our own small collectives), nccl for CUDA ones
        torch.distributed.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout))
    _joined = Group(rank, world, local_rank, local_world)
    log.info("rank %d of %d (local %d of %d)%s", rank, world, local_rank, local_world,
             f" on cuda:{local_rank}" if cuda else "")
    return _joined


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_rank(group: Group) -> int:
    """The cores of this node shared among its ranks (torchrun sets OMP_NUM_THREADS=1 otherwise)."""
    return max(1, _cores() // group.local_world)


def warn_if_oversubscribed(nproc: int) -> None:
    """More ranks on this machine than it has cores: each gets a share of a core, and their OpenMP
    threads wait for each other; say so."""
    cores = _cores()
    if nproc > cores:
        log.warning("--nproc %d: %d processes on %d cores, so each runs on a share of a core and the run is slower "
                    "than with --nproc %d", nproc, nproc, cores, cores)


def is_rank_failure(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another rank died or stopped answering. gloo
    words a timeout two ways: "Timed out waiting ..." in an all-reduce, "Application timeout caused
    pair closure" in DDP's broadcast of the buffers before a forward."""
    if isinstance(e, torch.distributed.DistError):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and any(
        m in text for m in ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout"))


# ---------------------------------------------------------------------------------------------
# BatchNorm over the global batch (torch's SyncBatchNorm runs on GPUs only).

class _SyncBatchNormFunction(torch.autograd.Function):
    """BatchNorm over the group's whole batch, forward and backward by hand: one all-reduce of the
    per-channel (count, sum, sum of squared deviations) forward, one of (sum dy, sum dy * (x - mean))
    backward; the normalisation itself is eval-mode batch_norm with the global statistics (one
    fused pass, bf16 in and out where the activations are bf16). `weight` and `bias` get this
    rank's share of their gradient, which DistributedDataParallel then sums over the ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        c = x.shape[1]
        xf = x.float()  # (N, C, H, W); N may be 0 on a rank whose share of the batch is empty
        n = xf.numel() // max(c, 1)
        if n:
            var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
        else:
            var, mean = xf.new_zeros(c), xf.new_zeros(c)
        # Per rank: n * mean and M2 + n * mean^2 (M2 = n * var): summed, they give the global mean and M2.
        stats = torch.cat([mean * n, (var + mean * mean) * n, xf.new_tensor([float(n)])])
        torch.distributed.all_reduce(stats)
        total = stats[-1]
        mean = stats[:c] / total.clamp(min=1)
        var = (stats[c:2 * c] / total.clamp(min=1) - mean * mean).clamp(min=0)
        invstd = torch.rsqrt(var + eps)
        y = torch.nn.functional.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.mark_non_differentiable(mean, var, total)
        ctx.total = float(total)
        return y, mean, var, total

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor, *unused: Any) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        dyf, centred = dy.float(), x.float() - mean.view(1, -1, 1, 1)
        sums = torch.cat([dyf.sum((0, 2, 3)), (dyf * centred).sum((0, 2, 3))])
        local_dy, local_dy_centred = sums[:c].clone(), sums[c:].clone()
        torch.distributed.all_reduce(sums)
        n = max(ctx.total, 1.0)
        mean_dy, mean_dy_centred = sums[:c] / n, sums[c:] / n
        scale = (invstd * weight.float()).view(1, -1, 1, 1)
        dx = (dyf - mean_dy.view(1, -1, 1, 1) - centred * (invstd * invstd * mean_dy_centred).view(1, -1, 1, 1)) * scale
        return dx.to(x.dtype), (local_dy_centred * invstd).to(weight.dtype), local_dy.to(weight.dtype), None


class SyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose batch statistics, in training, are those of every rank's images together
    (`_SyncBatchNormFunction`): a step is then one process's step on the global batch. The same
    parameters and buffers as BatchNorm2d, so checkpoints do not change."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_initialized() and self.affine):
            return super().forward(x)
        y, mean, var, n = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps)
        if self.track_running_stats and float(n) > 0:  # (n = 0: every image of the global batch failed)
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(var * (n / (n - 1).clamp(min=1)), alpha=m)
        return y


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm layers made BatchNorm2d again, in place (inference copies: BatchNorm folding
    and tracing want the standard module)."""
    for m in module.modules():
        if type(m) is SyncBatchNorm:
            m.__class__ = nn.BatchNorm2d
    return module


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `module` made a SyncBatchNorm in place. The class is swapped rather
    than the module replaced: the backbones' stage lists hold these very modules."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNorm
    return module


# ---------------------------------------------------------------------------------------------
# Launching, and what to tell a person.

LAUNCHED_NPROC = "HEADSTART_NPROC"  # set by `launch` for its ranks: the resume command repeats it


def resume_command(out: os.PathLike[str] | str) -> str:
    """The command that resumes the run in `out` the way this process was started."""
    if not launched():
        return f"headstart train --resume {out}"
    if os.environ.get(LAUNCHED_NPROC):
        return f"headstart train --resume {out} --nproc {os.environ[LAUNCHED_NPROC]}"
    return (f"torchrun --nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '?')} ... -m headstart train "
            f"--resume {out} (the same torchrun options on every node)")


def launch(args: Sequence[str], *, nproc: int) -> int:
    """Run `headstart ARGS` as `nproc` ranks on this machine under torchrun (its elastic agent, in
    this process: a free port on 127.0.0.1, gloo or nccl) and wait for them. Returns the exit
    code: 0, or the first failed rank's (its own message is on stderr; the failure is logged), or
    128 + the signal after a Ctrl-C or SIGTERM (each rank then saves and stops at the same step)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    warn_if_oversubscribed(nproc)
    os.environ[LAUNCHED_NPROC] = str(nproc)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_rank(Group(local_world=nproc))))
    torchrun = get_args_parser().parse_args(
        ["--nproc-per-node", str(nproc), "--standalone", "--no-python", "--", *_self_command(), *args])
    try:
        run(torchrun)
    except SignalException as e:  # Ctrl-C or SIGTERM: the agent passed it on to the ranks and waited for them
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        log.warning("rank %d (pid %d) ended with exit code %d%s", rank, failure.pid, failure.exitcode,
                    f" ({failure.signal_name()})" if failure.exitcode < 0 else "")
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    return 0


def _self_command() -> list[str]:
    """What each rank runs: this interpreter on this very headstart (its folder first on sys.path, in
    place of the current folder's, which a folder named `headstart` there would otherwise shadow)."""
    import sys

    package = __name__.split(".")[0]
    root = str(Path(sys.modules[package].__file__).resolve().parents[1])
    code = (f"import runpy, sys; sys.path[0] = {root!r}; "
            f"runpy.run_module({package!r}, run_name='__main__', alter_sys=True)")
    return [sys.executable, "-c", code]
