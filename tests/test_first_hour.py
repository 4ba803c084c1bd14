"""The first hour of a new user: what used to lose a run, lie, or end in a traceback (issue 15's
list, item by item; tiny model, generated data)."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.analysis.check import check_dataset
from headstart.cli import main
from headstart.data import scan_dataset
from headstart.io.runstate import read_run_state
from headstart.models import create_model, open_model
from headstart.training import Callback, TrainConfig, TrainingDiverged, TrainingInterrupted, resume, train

from .conftest import TINY, colour_image, make_dataset


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(arch="tiny", weights=None, strategy="finetune", epochs=2, batch_size=8, lr=0.05,
                                 workers=0), **kw})


def flat_dataset(root: Path, n: int = 8) -> Path:
    for name, colour in (("blue", (30, 40, 220)), ("red", (220, 40, 30))):
        (root / name).mkdir(parents=True)
        for i in range(n):
            colour_image(colour, seed=hash((name, i)) % 1000).save(root / name / f"{name}_{i}.png")
    return root


# 1. Training from inside a flat dataset.

def test_training_from_inside_a_dataset_writes_outside_it_and_runs_are_never_classes(tmp_path: Path, monkeypatch,
                                                                                     capsys) -> None:
    data = flat_dataset(tmp_path / "data")
    monkeypatch.chdir(data)
    assert main(["train", ".", "--val-split", "0.25", "--epochs", "1", *TINY]) == 0
    assert not (data / "runs").exists()
    assert "best checkpoint: " + str(tmp_path / "runs") in capsys.readouterr().out
    assert main(["train", ".", "--val-split", "0.25", "--epochs", "1", *TINY]) == 0  # again: still two classes
    assert json.loads(next((tmp_path / "runs").glob("*-2/summary.json")).read_text())["classes"] == ["blue", "red"]
    # A run written into the dataset by hand (--out) is refused; one that is there already is no class.
    assert main(["train", ".", "--val-split", "0.25", "--epochs", "1", "--out", "runs/x", *TINY]) == 2
    assert "inside the dataset" in capsys.readouterr().err
    (data / "runs" / "old").mkdir(parents=True)
    (data / "runs" / "old" / ".headstart-run").write_text("{}")
    colour_image((0, 255, 0)).save(data / "runs" / "old" / "predictions.png")
    assert scan_dataset(data, val_split=0.25).classes == ["blue", "red"]


# 2. A run folder that holds a run; two processes in one folder.

def test_a_run_folder_is_never_overwritten_by_accident(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(dataset, out=out, config=tiny(epochs=1))
    first = (out / "best.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"holds a run already: resume it \(--resume .*--overwrite"):
        train(dataset, out=out, config=tiny(epochs=1, seed=5))
    assert (out / "best.safetensors").read_bytes() == first
    train(dataset, out=out, config=tiny(epochs=1, seed=5), overwrite=True)
    assert (out / "best.safetensors").read_bytes() != first
    # The default folder never collides with one that holds a run.
    os.chdir(tmp_path)
    for _ in range(2):
        assert main(["train", str(dataset), "--epochs", "1", "--strategy", "finetune", *TINY]) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["data-tiny-finetune", "data-tiny-finetune-2"]


def test_a_lock_keeps_a_second_process_out_and_a_killed_one_leaves_none(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               f"f = open({str(out / '.headstart-lock')!r}, 'a+'); fcntl.lockf(f, fcntl.LOCK_EX)\n"
                               "f.write('4242'); f.flush(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE)
    assert holder.stdout.readline() == b"held\n"
    with pytest.raises(FileExistsError, match="another process .* is training into"):
        train(dataset, out=out, config=tiny(epochs=1))
    holder.kill()
    holder.wait()
    train(dataset, out=out, config=tiny(epochs=1))  # the kernel dropped the dead process's lock
    assert (out / "best.safetensors").is_file()


# 3. A file name that is not valid UTF-8.

def test_a_file_name_that_is_not_utf8_goes_through_every_command(dataset: Path, tmp_path: Path, capsys) -> None:
    name = os.fsdecode(b"f\xe9te.png")  # the bytes of a Latin-1 name, as Linux keeps them
    colour_image((220, 40, 30), seed=77).save(dataset / "val" / "red" / name)
    (dataset / "train" / "red" / os.fsdecode(b"br\xfbl\xe9.jpg")).write_bytes(b"\xff\xd8\xff not an image")
    out = tmp_path / "run"
    assert main(["train", str(dataset), "--epochs", "1", "--out", str(out), "--strategy", "finetune", *TINY]) == 0
    assert b"f\xe9te.png" in (out / "predictions.csv").read_bytes()  # the name's own bytes
    assert "br\\xfbl\\xe9.jpg" in (out / "report.html").read_text()  # the skipped file, shown escaped in the page
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["val"]["red"] == 7
    assert [os.fsencode(p) for p in summary["skipped_files"]] == [os.fsencode(dataset / "train" / "red") + b"/br\xfbl\xe9.jpg"]
    image = dataset / "val" / "red" / name
    for argv in (["predict", str(out / "best.safetensors"), str(image), "--workers", "0"],
                 ["evaluate", str(out / "best.safetensors"), str(dataset), "--workers", "0"],
                 ["check", str(dataset)], ["show", str(dataset), "--out", str(tmp_path / "b.png"), "--image-size", "32"]):
        assert main(argv) in (0, 1), argv  # check exits 1 on its findings, never on the name
    capsys.readouterr()


# 4. 16-bit images in `check`.

def test_check_reads_16_bit_images_as_training_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for cls, shift in (("a", 0), ("b", 20000)):
            folder = tmp_path / "d" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                arr = (rng.integers(0, 30000, (48, 48)) + shift).astype(np.uint16)
                Image.fromarray(arr).save(folder / f"{i}.png")  # a 16-bit greyscale PNG (mode I;16)
    report = check_dataset(tmp_path / "d")
    kinds = {f.kind for f in report.findings}
    assert not kinds & {"leakage", "duplicate", "placeholder"}, report.findings
    assert report.blocking() == []


# 5. A run that diverges.

def test_a_diverging_run_stops_naming_the_epoch_and_the_cause(dataset: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(TrainingDiverged, match=r"in epoch 1, step \d+: the run diverged.*--lr 1e\+30"):
        train(dataset, out=tmp_path / "run", config=tiny(lr=1e30))
    assert not (tmp_path / "run" / "best.safetensors").exists()  # nothing of it saved as best
    out = tmp_path / "cli"
    assert main(["train", str(dataset), "--out", str(out), "--lr", "1e30", "--strategy", "finetune",
                 *TINY[:-4], "--workers", "0"]) == 2
    assert "diverged" in capsys.readouterr().err
    # A checkpoint that holds non-finite weights is refused by predict and evaluate.
    model = create_model("tiny", num_classes=2)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    from headstart.data.transforms import Preprocessing
    from headstart.io.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "nan", model, classes=["blue", "red"], preprocessing=Preprocessing(image_size=32))
    for argv in (["predict", str(tmp_path / "nan.safetensors"), str(dataset / "val")],
                 ["evaluate", str(tmp_path / "nan.safetensors"), str(dataset)]):
        assert main(argv) == 2
        assert "not finite" in capsys.readouterr().err


# 6. Options between the positionals.

def test_options_may_come_between_the_positionals(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(dataset, out=out, config=tiny(epochs=1))
    image = dataset / "val" / "red" / "red_0.png"
    assert main(["predict", str(out / "best.safetensors"), "--top-k", "1", str(image), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out
    assert main(["evaluate", str(out / "best.safetensors"), "--workers", "0", str(dataset)]) == 0
    assert "accuracy" in capsys.readouterr().out


# 7. Options with --resume; a changed dataset.

def test_resume_takes_more_epochs_refuses_other_options_and_notices_a_changed_dataset(dataset: Path, tmp_path: Path,
                                                                                       capsys) -> None:
    out = tmp_path / "run"
    train(dataset, out=out, config=tiny(epochs=2))
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 0
    assert [r["epoch"] for r in json.loads((out / "summary.json").read_text())["history"]] == [1, 2, 3]
    assert main(["train", "--resume", str(out), "--lr", "0.5"]) == 2
    assert "--lr cannot change when a run resumes" in capsys.readouterr().err
    colour_image((220, 40, 30), seed=91).save(dataset / "train" / "red" / "new.png")
    (dataset / "val" / "blue" / "blue_0.png").unlink()
    with pytest.raises(ValueError, match=r"changed since the run .* 1 added in train \(train/red/new.png\); 1 removed in val"):
        resume(out, epochs=4)


# 8. --bad-files fail.

def test_bad_files_fail_decodes_every_file_before_training(dataset: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    colour_image((30, 40, 220), size=(200, 200), seed=3).save(buf, "JPEG")
    (dataset / "train" / "blue" / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match=r"cut.jpg: cannot decode.*truncated"):
        train(dataset, out=tmp_path / "run", config=tiny(bad_files="fail"))
    assert not (tmp_path / "run" / "state.safetensors").exists()


# 9. One class.

def test_one_class_is_an_error(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "d", classes={"red": (220, 40, 30)})
    with pytest.raises(ValueError, match=r"one class folder \('red'\): a classifier needs at least two"):
        train(data, out=tmp_path / "run", config=tiny())


# 10. File modes.

@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_files_honour_the_umask(dataset: Path, tmp_path: Path, mask: int) -> None:
    old = os.umask(mask)
    try:
        out = tmp_path / "run"
        train(dataset, out=out, config=tiny(epochs=1))
        assert main(["evaluate", str(out / "best.safetensors"), str(dataset), "--workers", "0", "--json",
                     str(tmp_path / "m.json")]) == 0
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [*out.iterdir(), tmp_path / "m.json"] if p.is_file()}
    assert set(modes.values()) == {want}, modes


# 11. Tracebacks that become messages.

def test_what_used_to_end_in_a_traceback_is_a_message(dataset: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    train(dataset, out=out, config=tiny(epochs=1))
    ckpt = str(out / "best.safetensors")
    cases = [(["train", str(dataset), "--threads", "-1", *TINY], "threads must be at least 1"),
             (["predict", ckpt, str(dataset / "val"), "--threads", "-1"], "threads must be 1 or more"),
             (["predict", ckpt, str(dataset / "val"), "--device", "tpu"], "device 'tpu' is not one of"),
             (["predict", ckpt, str(dataset / "val"), "--device", "mps"], "device 'mps' is not one of")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "summary.json").write_text("{}")
    cases.append((["report", str(tmp_path / "empty")], "summary.json lacks data"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)
    state = read_run_state(out / "state.safetensors")
    from headstart.io.formats.safetensors import write_tagged

    write_tagged(out / "state.safetensors", state.tensors, {k: v for k, v in state.meta.items() if k != "config"})
    assert main(["train", "--resume", str(out)]) == 2
    assert "lacks what a resume needs" in capsys.readouterr().err


def test_ctrl_c_in_the_first_second_is_no_traceback(dataset: Path, tmp_path: Path) -> None:
    for delay in (0.3, 1.0):
        p = subprocess.Popen([sys.executable, "-m", "headstart", "train", str(dataset), "--out",
                              str(tmp_path / f"run{delay}"), *TINY], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert b"Traceback" not in err, err.decode()[-2000:]
        assert p.returncode in (0, 130), (p.returncode, err.decode()[-500:])


# 12. Ctrl-C while the features are computed, or the pictures drawn.

class _InterruptWhen(Callback):
    def __init__(self, phase: str) -> None:
        self.phase, self.sent = phase, False

    def on_step(self, phase, epoch, step, steps, loss) -> None:
        if phase.startswith(self.phase) and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_during_features_or_pictures_says_how_to_go_on(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(TrainingInterrupted, match="while the strategy prepared .* run the same command again"):
        train(dataset, out=tmp_path / "a", config=tiny(strategy="frozen"), callback=_InterruptWhen("features"))
    def interrupted(*a, **k):  # a Ctrl-C while the curves are drawn, after every epoch
        raise KeyboardInterrupt

    monkeypatch.setattr("headstart.report.plots.save_curves", interrupted)
    with pytest.raises(TrainingInterrupted, match=r"while writing the pictures.*--resume"):
        train(dataset, out=tmp_path / "b", config=tiny(strategy="frozen"))
    monkeypatch.undo()
    resume(tmp_path / "b")  # a resume of a run whose epochs are done draws them
    assert (tmp_path / "b" / "curves.png").is_file() and (tmp_path / "b" / "report.html").is_file()


# 13. Smaller ones.

def test_the_smaller_ones(dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    image = dataset / "val" / "red" / "red_0.png"
    assert main(["train", str(image), *TINY]) == 2
    assert "is a file, not a dataset folder" in capsys.readouterr().err
    flat = flat_dataset(tmp_path / "flat")
    assert main(["train", str(flat), *TINY]) == 2
    assert "--val-split 0.2" in capsys.readouterr().err
    assert main(["train", str(flat), "--val-split", "1.5", *TINY]) == 2
    assert "--val-split (val_split) must be between 0 and 1" in capsys.readouterr().err

    class Evil:
        def __reduce__(self):
            return (print, ("hello",))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pth")
    assert main(["predict", "--weights", str(tmp_path / "evil.pth"), "--arch", "tiny", str(image)]) == 2
    err = capsys.readouterr().err
    assert "never runs pickled code" in err and "weights_only=False" not in err

    out = tmp_path / "run"
    train(dataset, out=out, config=tiny(epochs=1))
    (tmp_path / "nothing").mkdir()
    assert main(["predict", str(out / "best.safetensors"), str(tmp_path / "nothing")]) == 2
    assert "no image files in" in capsys.readouterr().err
    assert main(["check", str(dataset), "--allow", "leakge"]) == 2
    assert "not a kind of error the check reports; the kinds are class-missing" in capsys.readouterr().err

    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    monkeypatch.setenv("HEADSTART_HOME", str(tmp_path / "ro" / "home"))
    if os.geteuid() != 0:  # (root writes anywhere)
        assert main(["weights"]) == 2
        assert "HEADSTART_HOME" in capsys.readouterr().err
    monkeypatch.setenv("HEADSTART_HOME", str(tmp_path / "home"))

    assert main(["convert", str(out / "best.safetensors"), str(tmp_path / "copy.safetensors")]) == 0
    before, after = json.loads((out / "best.json").read_text()), json.loads((tmp_path / "copy.json").read_text())
    assert after["config"] == before["config"] and after["epoch"] == before["epoch"]
    assert after["metrics"] == before["metrics"]

    (tmp_path / "pics").mkdir()
    assert main(["show", str(dataset), "--out", str(tmp_path / "pics") + "/", "--image-size", "32"]) == 0
    assert (tmp_path / "pics" / "batch.png").is_file()
    assert main(["show", str(dataset), "--out", str(tmp_path / "new") + "/", "--image-size", "32"]) == 0
    assert (tmp_path / "new" / "batch.png").is_file()
    capsys.readouterr()


# A kill costs at most --save-every of training; --resume on a folder without a state.

@pytest.mark.slow
def test_a_kill_mid_epoch_loses_at_most_save_every(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 60, "val": 6})
    reference = train(data, out=tmp_path / "ref", config=tiny(epochs=2))
    run = tmp_path / "run"
    args = ["train", str(data), "--out", str(run), "--epochs", "2", "--save-every", "0.05", "--strategy", "finetune",
            *TINY]
    slow = "import sys, time, headstart.training.optim as s\n" \
           "real = s.Stepper.step\n" \
           "s.Stepper.step = lambda self, loss: (time.sleep(0.1), real(self, loss))\n" \
           "from headstart.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    p = subprocess.Popen([sys.executable, "-c", slow, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def mid_epoch_steps() -> int:
        try:
            s = read_run_state(run / "state.safetensors", tensors=False).state
        except (FileNotFoundError, ValueError):
            return 0
        return s.progress.steps if s.epoch == 0 else 0

    end = time.monotonic() + 60
    while mid_epoch_steps() < 3 and time.monotonic() < end and p.poll() is None:
        time.sleep(0.02)
    p.kill()
    p.wait()
    assert mid_epoch_steps() >= 3, "a state saved in the middle of the first epoch"
    resumed = resume(run)
    a, b = open_model(reference.last_checkpoint).model.state_dict(), open_model(resumed.last_checkpoint).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    (tmp_path / "fresh").mkdir()
    with pytest.raises(FileNotFoundError, match="no run state .* Start it again, without --resume"):
        resume(tmp_path / "fresh")


# The demo offline: the solar cells as class folders, made reproducibly.

def test_the_demo_makes_class_folders_of_the_solar_cells(tmp_path: Path, monkeypatch) -> None:
    import headstart.demo as demo

    wheel = tmp_path / "elpv.whl"
    labels = []
    with zipfile.ZipFile(wheel, "w") as z:
        for i, prob in enumerate([0.0] * 12 + [1.0] * 12 + [1 / 3] * 3):
            name = f"images/cell{i:04d}.png"
            buf = io.BytesIO()
            Image.fromarray(np.full((30, 30), i * 9, np.uint8), "L").save(buf, "PNG")
            z.writestr(f"elpv_dataset/data/{name}", buf.getvalue())
            labels.append(f"{name}  {prob}  mono")
        z.writestr("elpv_dataset/data/labels.csv", "\n".join(labels) + "\n")
    monkeypatch.setattr(demo, "fetch_wheel", lambda *a, **k: wheel)
    root = demo.fetch_elpv(per_class=(5, 3))
    splits = scan_dataset(root)
    assert splits.classes == ["defective", "functional"] and splits.counts() == {
        "train": {"defective": 5, "functional": 5}, "val": {"defective": 3, "functional": 3}}
    first = sorted(str(s.path.relative_to(root)) for s in splits.train)
    import shutil

    shutil.rmtree(root)
    again = scan_dataset(demo.fetch_elpv(per_class=(5, 3)))
    assert sorted(str(s.path.relative_to(root)) for s in again.train) == first  # the same files every time
    monkeypatch.setattr(demo, "fetch_canidae", lambda **k: (_ for _ in ()).throw(ConnectionError("offline")))
    monkeypatch.setattr(demo, "ELPV_PER_CLASS", (5, 3))
    data, about = demo.demo_dataset()
    assert data == root and "CC BY-NC-SA 4.0" in about
