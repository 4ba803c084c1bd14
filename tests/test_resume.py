"""Resume after Ctrl-C and after SIGKILL: the final weights equal an uninterrupted run's, bit for bit."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from headstart.io.runstate import read_run_state
from headstart.models import open_model
from headstart.training import Callback, TrainConfig, TrainingInterrupted, resume, train

from .conftest import make_dataset

EPOCHS = 8


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(arch="tiny", weights=None, strategy="finetune", epochs=EPOCHS, batch_size=8, lr=0.05,
                                 workers=0), **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return open_model(run / "last.safetensors").model.state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _InterruptAt(Callback):
    """Sends this process a SIGINT (as Ctrl-C would) at a given training step of a given epoch."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step, self.sent = epoch, step, False

    def on_step(self, phase, epoch, step, steps, loss) -> None:
        if phase == "train" and (epoch, step) == (self.epoch, self.step) and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("strategy,feature_cache", [("finetune", "off"), ("frozen", "memory"), ("partial", "off"),
                                                    ("gradual", "memory"), ("auto", "memory")])
def test_ctrl_c_saves_mid_epoch_and_resume_is_bit_identical(dataset: Path, tmp_path: Path, strategy: str,
                                                            feature_cache: str) -> None:
    cfg = config(strategy=strategy, feature_cache=feature_cache, budget="1h" if strategy == "auto" else None,
                 patience=0)
    reference = train(dataset, out=tmp_path / "ref", config=cfg)
    with pytest.raises(TrainingInterrupted, match="--resume") as e:
        train(dataset, out=tmp_path / "run", config=cfg, callback=_InterruptAt(epoch=3, step=2))
    assert (e.value.epoch, e.value.step) == (3, 2)
    meta = read_run_state(tmp_path / "run" / "state.safetensors").meta
    assert meta["state"]["epoch"] == 2 and meta["state"]["progress"]["steps"] == 2
    resumed = resume(tmp_path / "run")
    assert same(weights(tmp_path / "ref"), weights(tmp_path / "run"))
    assert [r.train_loss for r in resumed.history] == pytest.approx([r.train_loss for r in reference.history])
    assert resumed.best_val_acc == reference.best_val_acc


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["partial", "gradual"])
def test_sigkill_between_epochs_then_resume_is_bit_identical(tmp_path: Path, strategy: str) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 24, "val": 6})
    train(data, out=tmp_path / "ref", config=config(strategy=strategy, train_from="block2"))
    run = tmp_path / "run"
    args = ["train", str(data), "--arch", "tiny", "--weights", "none", "--strategy", strategy, "--train-from",
            "block2", "--epochs", str(EPOCHS), "--batch-size", "8", "--lr", "0.05", "--patience", "off", "--workers",
            "0", "--out", str(run)]
    p = start_cli(args, slow_fsync=0.05)
    assert _wait_for(lambda: epochs_done(run) >= 2 or p.poll() is not None)
    p.kill()
    p.wait()
    assert 2 <= epochs_done(run) < EPOCHS, "killed mid-run"
    resume(run)
    assert same(weights(tmp_path / "ref"), weights(run))


def test_resume_of_a_missing_run_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="state.safetensors"):
        resume(tmp_path / "nothing")


# --- SIGKILL at random points, in a real `headstart train` process -------------------------------

RUNNER = """
import os, sys, time
delay = float(os.environ.get("SLOW_FSYNC", "0"))
if delay:  # widen the window in which a checkpoint is being written, so a kill lands inside it
    real = os.fsync
    def slow(fd):
        time.sleep(delay)
        real(fd)
    os.fsync = slow
from headstart.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _readable(run: Path) -> None:
    """Every checkpoint and state file in the run folder loads; no temporary file is mistaken for one."""
    for name in ("best", "last"):
        if (run / f"{name}.safetensors").exists():
            open_model(run / f"{name}.safetensors")
    if (run / "state.safetensors").exists():
        read_run_state(run / "state.safetensors")


def _wait_for(cond, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def start_cli(args: list[str], *, slow_fsync: float = 0.0, stderr: int = subprocess.DEVNULL) -> subprocess.Popen:
    """`headstart ARGS` in a child process (RUNNER), every fsync slowed by `slow_fsync` s."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SLOW_FSYNC": str(slow_fsync)}
    return subprocess.Popen([sys.executable, "-c", RUNNER, *args], env=env, stdout=subprocess.DEVNULL, stderr=stderr)


def epochs_done(run: Path, *, none: int = -1) -> int:
    """The epochs the run state in `run` has saved; `none` before it holds one that reads."""
    try:
        return read_run_state(run / "state.safetensors", tensors=False).state.epoch
    except (FileNotFoundError, ValueError):
        return none


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 40, "val": 10})
    epochs = 2 * EPOCHS  # enough that the last random kill still lands before the end
    train(data, out=tmp_path / "ref", config=config(epochs=epochs))
    run = tmp_path / "run"
    args = ["train", str(data), "--arch", "tiny", "--weights", "none", "--epochs", str(epochs), "--batch-size", "8",
            "--lr", "0.05", "--patience", "off", "--workers", "0", "--out", str(run)]
    rng = random.Random(1234)

    def start(slow_fsync: float = 0.0) -> subprocess.Popen:
        resuming = (run / "state.safetensors").exists()
        return start_cli(["train", "--resume", str(run)] if resuming else args, slow_fsync=slow_fsync,
                         stderr=subprocess.PIPE)

    kills = []
    # 1-2: during a checkpoint or state write (fsync slowed so the kill lands inside it).
    for _ in range(2):
        for stale in run.glob(".*.tmp"):  # so that only a temporary of the new process can end the wait
            stale.unlink()
        p = start(slow_fsync=0.5)
        assert _wait_for(lambda: any(run.glob(".*.tmp")) or p.poll() is not None)
        running = p.poll() is None
        p.kill()
        p.wait()
        kills.append(("during a write", running, epochs_done(run, none=0)))
        assert any(run.glob(".*.tmp")), "the kill should have landed inside an atomic write"
        _readable(run)
    # 3-6: at random moments of training, after a random number of completed epochs.
    for _ in range(4):
        before = epochs_done(run, none=0)
        p = start(slow_fsync=0.02)
        _wait_for(lambda: epochs_done(run, none=0) > before or p.poll() is not None)
        time.sleep(rng.uniform(0.0, 0.3))
        running = p.poll() is None
        p.kill()
        p.wait()
        kills.append(("random", running, epochs_done(run, none=0)))
        _readable(run)
    # Every kill hit a running process, each random one after more epochs than the one before,
    # and the run was not over: the last start resumes real work.
    assert all(running for _, running, _ in kills), kills
    done = [d for kind, _, d in kills if kind == "random"]
    assert all(b > a for a, b in zip(done, done[1:])) and done[-1] < epochs, kills
    (run / ".last.safetensors.left-by-a-kill.tmp").write_bytes(b"half a checkpoint")
    p = start()
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    assert epochs_done(run, none=0) == epochs
    assert same(weights(tmp_path / "ref"), weights(run)), kills
    assert not any(run.glob(".*.tmp")), "a new start clears the temporaries that killed writes left"


def test_full_disk_gives_a_clear_error_and_keeps_the_previous_best(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    import errno

    import headstart.io.download as download

    real_fsync = os.fsync

    class _FullDisk(Callback):
        def on_epoch_end(self, record) -> None:
            if record.epoch == 2:  # from epoch 3 on, the disk is full
                def fsync(fd: int) -> None:
                    raise OSError(errno.ENOSPC, "No space left on device")
                monkeypatch.setattr(download.os, "fsync", fsync)

    with pytest.raises(OSError, match="could not write .*No space left on device.*intact") as e:
        train(dataset, out=tmp_path / "run", config=config(), callback=_FullDisk())
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(download.os, "fsync", real_fsync)
    best = open_model(tmp_path / "run" / "best.safetensors")
    assert best.meta["epoch"] <= 2
    assert read_run_state(tmp_path / "run" / "state.safetensors").state.epoch == 2
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_unwritable_run_folder_names_the_path(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    import tempfile

    def mkstemp(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(PermissionError, match=f"could not write {tmp_path / 'run'}.*Permission denied"):
        train(dataset, out=tmp_path / "run", config=config(epochs=1))


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the processes from /proc")
def test_a_run_killed_with_its_data_workers_alive_resumes_at_once(tmp_path: Path) -> None:
    """Issue 25: the run folder's lock was an flock, shared with the data loader's forked workers,
    which outlive a killed run for a moment: `--resume` right after a kill -9 was refused ("another
    process (pid N) is training into"), N the dead process. The lock is now the process's own."""
    data = make_dataset(tmp_path / "data", per_class={"train": 24, "val": 6})
    run = tmp_path / "run"
    args = ["train", str(data), "--arch", "tiny", "--weights", "none", "--strategy", "finetune", "--epochs", "3",
            "--batch-size", "8", "--lr", "0.05", "--workers", "2", "--out", str(run)]
    p = start_cli(args)
    assert _wait_for(lambda: epochs_done(run) >= 1 or p.poll() is not None)
    workers = _children(p.pid)
    p.kill()
    p.wait()
    assert 1 <= epochs_done(run) < 3 and workers, "killed mid-run, with its data workers running"
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    resumed = resume(run)  # at once: the workers of the dead run may still be there
    assert resumed.history[-1].epoch == 3
    assert alive, "the kill left no worker alive for a moment: the case was not tested"
