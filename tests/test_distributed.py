"""Data-parallel training: 2 CPU ranks on 127.0.0.1 with gloo, against one process.

What "the same" means here: the global batch (--batch-size) and the seed are the same, the step is
one process's step on that batch (runtime/distributed.py; --sync-batchnorm: BatchNorm over the global
batch, as one process computes it), so the ranks end with bit-identical weights and
these agree with one process's within fp32 rounding, grown by training: TOL below. One step's
gradients agree to 3e-8 (relative 1e-6); after 3 epochs of 5 steps the largest difference seen was
3.6e-7 (finetune) and 3.5e-5 (gradual, whose head, fitted by L-BFGS on features that differ in the
7th digit, has weights of 2 to 5 and makes the steps larger). Precision fp32: bf16 rounds the same
additions in another order to differences of 1e-3.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from headstart.data import EpochBatches
from headstart.io.formats.safetensors import read_safetensors

from .conftest import make_dataset

TOL = dict(rtol=1e-4, atol=1e-4)
SIDE = Path(__file__).with_name("distributed_side.py")
TINY = ["--arch", "tiny", "--weights", "none", "--image-size", "32", "--batch-size", "6", "--workers", "0",
        "--precision", "fp32", "--threads", "1"]


def headstart(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "headstart", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def one_process(*args: str) -> int:
    """`headstart ARGS` in this process, as the reference one process trains (no interpreter to start:
    about 2 s a run); the torch threads it sets (--threads 1) are given back after."""
    from headstart.cli import main

    threads = torch.get_num_threads()
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(threads)


def torchrun(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                           *args], capture_output=True, text=True, timeout=300)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], **(tol or {"rtol": 0, "atol": 0}), msg=lambda m: f"{k}: {m}")


def run_files(run: Path) -> set[str]:
    return {p.name for p in run.iterdir()}


def test_batches_of_the_ranks_are_one_process_batches() -> None:
    """Each rank takes every world-th image of each global batch: together, every image once per
    epoch, in one process's order; every rank has as many batches (some may be empty)."""
    one = EpochBatches(23, batch_size=6, shuffle=True, seed=3)
    one.set_epoch(2)
    ranks = [EpochBatches(23, batch_size=6, shuffle=True, seed=3, rank=r, world=3) for r in range(3)]
    for r in ranks:
        r.set_epoch(2)
    per_rank = [list(r) for r in ranks]
    assert all(len(b) == len(one) == 4 for b in per_rank)
    for step, batch in enumerate(one):
        together = sorted(i for r in per_rank for i in r[step])
        assert together == sorted(batch)
    assert sorted(i for b in one for i, _ in b) == list(range(23))
    resumed = EpochBatches(23, batch_size=6, shuffle=True, seed=3, rank=1, world=3)
    resumed.set_epoch(2, start=2)
    assert list(resumed) == per_rank[1][2:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["finetune", "gradual"])
def test_two_ranks_hold_the_weights_of_one_process(tmp_path: Path, strategy: str) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 13, "val": 5})
    single, multi, dump = tmp_path / "one", tmp_path / "two", tmp_path / "dump"
    dump.mkdir()
    # 26 images in batches of 5: the last batch has 1 image, so rank 1's share of it is empty
    args = [str(data), "--strategy", strategy, "--epochs", "3", *TINY, "--batch-size", "5", "--sync-batchnorm"]
    assert one_process("train", *args, "--out", str(single)) == 0
    two = torchrun(str(SIDE), str(dump), "train", *args, "--out", str(multi))
    assert two.returncode == 0, two.stderr
    assert_weights_close(weights(dump / "rank1.safetensors"), weights(multi / "last.safetensors"))  # bit-identical
    assert_weights_close(weights(multi / "last.safetensors"), weights(single / "last.safetensors"), **TOL)
    assert run_files(multi) == run_files(single)
    # Only rank 0 prints; the epoch line says the world size and the global batch.
    assert two.stdout.count("best val acc") == 1 and two.stdout.count("epoch 3/3") == 1, two.stdout
    assert "2 ranks, global batch 5" in two.stdout
    csv = (multi / "metrics.csv").read_text()
    assert csv.splitlines()[0].endswith("ranks,global_batch") and csv.splitlines()[-1].endswith(",2,5")


@pytest.mark.slow
def test_frozen_features_are_gathered_as_one_process_computes_them(tmp_path: Path, monkeypatch) -> None:
    """The frozen strategy: each rank computes its share of the features, all ranks get them all (in
    one process's order), and rank 0 trains the head once; the other ranks are done after the features."""
    data = make_dataset(tmp_path / "data", per_class={"train": 13, "val": 5})
    homes = {n: tmp_path / f"home{n}" for n in (1, 2)}
    args = [str(data), "--strategy", "frozen", "--epochs", "3", *TINY]
    monkeypatch.setenv("HEADSTART_HOME", str(homes[1]))
    assert one_process("train", *args, "--out", str(tmp_path / "one")) == 0
    two = headstart("train", *args, "--out", str(tmp_path / "two"), "--nproc", "2",
                    env={**os.environ, "HEADSTART_HOME": str(homes[2])})
    assert two.returncode == 0, two.stderr
    caches = {n: sorted((h / "features").glob("*.safetensors")) for n, h in homes.items()}
    assert len(caches[1]) == 2 and [p.name for p in caches[1]] == [p.name for p in caches[2]]  # train, val
    for a, b in zip(caches[1], caches[2]):
        ta, tb = weights(a), weights(b)
        assert torch.equal(ta["indices"], tb["indices"]) and torch.equal(ta["labels"], tb["labels"])
        torch.testing.assert_close(ta["features"], tb["features"], rtol=1e-6, atol=1e-6)
    assert_weights_close(weights(tmp_path / "two" / "last.safetensors"), weights(tmp_path / "one" / "last.safetensors"),
                         **TOL)


def _rank_pid(rank: int, marker: str, timeout: float = 60) -> int:
    """The pid of the process that torchrun started as `rank` for the run whose command line holds `marker`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                cmd = (proc / "cmdline").read_bytes().split(b"\0")
                env = (proc / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if marker.encode() in cmd and f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} process for {marker}")


@pytest.mark.slow
def test_a_killed_rank_ends_the_run_with_a_message_and_resume_finishes_it(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 40, "val": 5})  # 14 steps an epoch
    run = tmp_path / "run"
    args = [str(data), "--strategy", "finetune", "--epochs", "10", *TINY, "--sync-batchnorm", "--timeout", "20s"]
    p = subprocess.Popen([sys.executable, "-m", "headstart", "train", *args, "--out", str(run), "--nproc", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pid = _rank_pid(1, str(run))
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists() or len((run / "metrics.csv").read_text().splitlines()) < 3:
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)  # mid-epoch: an epoch is most of the time
        killed = time.monotonic()
        out, err = p.communicate(timeout=60)
        took = time.monotonic() - killed
    finally:
        p.kill()
    assert p.returncode != 0
    assert took < 20, took  # the other rank's next collective fails at once (sockets closed), within the timeout
    assert "rank 0 of 2: another rank died or stopped answering" in err, err
    assert f"resume all ranks with: headstart train --resume {run} --nproc 2" in err, err
    done_before = len((run / "metrics.csv").read_text().splitlines()) - 1
    assert 2 <= done_before < 10
    resumed = headstart("train", "--resume", str(run), "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {run} after epoch" in resumed.stdout
    rows = (run / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 11))
    # The resumed run ends where one uninterrupted process does (the state is an epoch's end or a step's).
    assert one_process("train", *args, "--out", str(tmp_path / "one")) == 0
    assert_weights_close(weights(run / "last.safetensors"), weights(tmp_path / "one" / "last.safetensors"), **TOL)


@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_others_after_the_timeout(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 40, "val": 5})
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "headstart", "train", str(data), "--strategy", "finetune", "--epochs",
                          "100", *TINY, "--timeout", "6s", "--out", str(run), "--nproc", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = None
    try:
        rank0, rank1 = _rank_pid(0, str(run)), _rank_pid(1, str(run))
        deadline = time.monotonic() + 120
        while not (run / "metrics.csv").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()
            time.sleep(0.05)
        os.kill(rank1, signal.SIGSTOP)  # alive, answering nothing
        stopped = time.monotonic()
        while _alive(rank0) and time.monotonic() - stopped < 90:
            time.sleep(0.1)
        took = time.monotonic() - stopped
    finally:
        if rank1 is not None:
            os.kill(rank1, signal.SIGKILL)
        if p.poll() is None:
            time.sleep(1)
    out, err = p.communicate(timeout=60)
    assert p.returncode != 0
    assert 5 < took < 40, took  # the 6 s timeout, and not much longer
    assert "rank 0 of 2: another rank died or stopped answering (" in err, err
    assert re.search(r"timed out|application timeout", err, re.I), err  # gloo's two wordings (is_rank_failure)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_at_the_same_step_and_rank_0_says_how_to_resume(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 40, "val": 5})
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "headstart", "train", str(data), "--strategy", "finetune", "--epochs",
                          "100", *TINY, "--out", str(run), "--nproc", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.csv").exists():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            raise AssertionError(p.communicate())
        time.sleep(0.05)
    try:
        p.send_signal(signal.SIGINT)  # torchrun's agent passes it on to the ranks
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.count("interrupted in epoch") == 1, err  # rank 0's message, once
    assert f"the run state is saved. Resume with: headstart train --resume {run} --nproc 2" in err, err
    assert "Traceback" not in err, err


def test_the_fused_batchnorm_kernel_leaves_synchronised_layers_alone() -> None:
    """The fused bf16 BatchNorm kernel (kernels/) computes one rank's statistics: a SyncBatchNorm
    layer must take its own path, whatever the input."""
    from headstart.models import kernels
    from headstart.runtime.distributed import SyncBatchNorm, plain_batchnorm, sync_batchnorm

    net = torch.nn.Sequential(torch.nn.BatchNorm2d(8)).train()
    x = torch.randn(4, 8, 6, 6).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    plain = kernels._fusable(net[0], x, None)
    assert plain == kernels.kernels_available()  # the plain layer takes the kernel where it is built
    sync_batchnorm(net)
    assert type(net[0]) is SyncBatchNorm and not kernels._fusable(net[0], x, None)
    plain_batchnorm(net)
    assert type(net[0]) is torch.nn.BatchNorm2d


@pytest.mark.slow
def test_without_sync_batchnorm_the_ranks_still_agree(tmp_path: Path) -> None:
    """DDP's default: each rank normalises with its own images' statistics; rank 0's buffers are
    sent before each forward, so the ranks still end with the same weights (not one process's)."""
    data = make_dataset(tmp_path / "data", per_class={"train": 13, "val": 5})
    dump = tmp_path / "dump"
    dump.mkdir()
    two = torchrun(str(SIDE), str(dump), "train", str(data), "--strategy", "finetune", "--epochs", "2", *TINY,
                   "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr
    mine, zero = weights(dump / "rank1.safetensors"), weights(tmp_path / "two" / "last.safetensors")
    assert_weights_close({k: v for k, v in mine.items() if "running" not in k and "num_batches" not in k},
                         {k: v for k, v in zero.items() if "running" not in k and "num_batches" not in k})


def test_either_wording_of_a_gloo_timeout_is_a_rank_failure() -> None:
    """A rank that stops answering times out an all-reduce ("Timed out waiting ...") or, when the others
    wait in DDP's broadcast of the buffers, closes the pair ("Application timeout ..."): both end the
    run with RankLost's message, not a traceback (seen once in a full run of the hang test above)."""
    from headstart.runtime.distributed import is_rank_failure

    assert is_rank_failure(RuntimeError("Application timeout caused pair closure"))
    assert is_rank_failure(RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 6000ms for "
                                        "recv operation to complete"))
    assert not is_rank_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)"))
    assert not is_rank_failure(ValueError("timeout must be at least 1"))
