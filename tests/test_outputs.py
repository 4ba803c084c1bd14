"""Nothing lost: a command never replaces or removes a file it did not write (io/outputs.py).

For every command that writes a file: a file of the user's at the output path is left as it is
(the command is refused, naming --overwrite), a file of the command's own kind is replaced, and
--overwrite replaces anything. A failed export leaves the export that was there before.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from headstart.cli import main

from .conftest import TINY, make_dataset

pytest.importorskip("onnxruntime")

USERS = b"the user's own file: not to be touched"


@pytest.fixture
def run(tiny_run: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_run  # the session's tiny frozen run (conftest)


def _users_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(USERS)
    return path


COMMANDS = {  # command -> (argv with OUT for the output file, what a second run of it may replace)
    "export onnx": lambda r, d, out: ["export", str(r / "best.safetensors"), "--out", str(out)],
    "export openvino": lambda r, d, out: ["export", str(r / "best.safetensors"), "--out", str(out)],
    "report": lambda r, d, out: ["report", str(r), "--out", str(out)],
    "show": lambda r, d, out: ["show", str(d), "--out", str(out), "--image-size", "32", "--batch-size", "4"],
    "convert headstart": lambda r, d, out: ["convert", str(r / "best.safetensors"), str(out)],
    "convert safetensors": lambda r, d, out: ["convert", str(r / "best.safetensors"), str(out), "--to", "safetensors"],
    "convert pth": lambda r, d, out: ["convert", str(r / "best.safetensors"), str(out)],
    "evaluate --json": lambda r, d, out: ["evaluate", str(r / "best.safetensors"), str(d), "--workers", "0",
                                          "--json", str(out)],
    "check --json": lambda r, d, out: ["check", str(d), "--json", str(out)],
}
SUFFIX = {"export onnx": ".onnx", "export openvino": ".xml", "report": ".html", "show": ".png",
          "convert headstart": ".safetensors", "convert safetensors": ".safetensors", "convert pth": ".pth",
          "evaluate --json": ".json", "check --json": ".json"}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_file_of_the_users_is_left_alone_and_its_own_kind_is_replaced(run, tmp_path: Path, capsys,
                                                                       command: str) -> None:
    folder, data = run
    out = _users_file(tmp_path / f"out{SUFFIX[command]}")
    argv = COMMANDS[command](folder, data, out)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out} exists and is not a" in err and "--overwrite" in err, err
    assert out.read_bytes() == USERS
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # nothing left beside it either
    assert main([*argv, "--overwrite"]) == 0  # told to: replaced
    written = out.read_bytes()
    assert written != USERS
    assert main(argv) == 0  # a file of its own kind: replaced without being told
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_check_csv_leaves_a_users_file_alone(run, tmp_path: Path, capsys, monkeypatch) -> None:
    """check --labels --csv (the label check itself runs on a stand-in: the rule is what is tested)."""
    from headstart.analysis import labels

    _, data = run
    rows = [labels.LabelRow(str(data / "train" / "red" / "red_0.png"), "train", "red", "blue", 0.1, True)]
    monkeypatch.setattr(labels, "find_label_issues", lambda *a, **k: rows)
    out = _users_file(tmp_path / "labels.csv")
    argv = ["check", str(data), "--labels", "--csv", str(out)]
    assert main(argv) == 2 and out.read_bytes() == USERS
    assert "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and out.read_text().startswith("rank,path,split,given")
    assert main(argv) == 0  # its own CSV: replaced


def test_export_over_a_checkpoint_is_refused_before_anything_is_written(run, tmp_path: Path, capsys) -> None:
    """Issue 25, 1: --out with a suffix that is no export's wrote over the file, then removed it."""
    folder, _ = run
    ckpt = tmp_path / "best.safetensors"
    shutil.copy(folder / "best.safetensors", ckpt)
    before = ckpt.read_bytes()
    assert main(["export", str(folder / "best.safetensors"), "--out", str(ckpt)]) == 2
    assert "end it in .onnx (ONNX) or .xml (OpenVINO IR)" in capsys.readouterr().err
    assert ckpt.read_bytes() == before
    # --out m.xml without --format: the suffix says OpenVINO (it used to be refused, and the file removed)
    assert main(["export", str(folder / "best.safetensors"), "--out", str(tmp_path / "m.xml")]) == 0
    assert (tmp_path / "m.xml").is_file() and (tmp_path / "m.bin").is_file()
    assert main(["export", str(folder / "best.safetensors"), "--format", "onnx", "--out", str(tmp_path / "m.xml")]) == 2
    assert "end it in .onnx" in capsys.readouterr().err


def test_a_failed_export_leaves_the_good_one_that_was_there(run, tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 25, 2: a gate that fails (or images that cannot be read, or a Ctrl-C) removed the good export."""
    import headstart.export.writers as ex

    folder, _ = run
    good = tmp_path / "good.xml"
    assert main(["export", str(folder / "best.safetensors"), "--format", "openvino", "--out", str(good)]) == 0
    xml, bin_ = good.read_bytes(), good.with_suffix(".bin").read_bytes()
    text = _users_file(tmp_path / "notes" / "README.md")
    assert main(["export", str(folder / "best.safetensors"), "--out", str(good), "--images", str(text)]) == 2
    assert "none of the 1 image(s) to check the export on" in capsys.readouterr().err
    real = ex.check_parity

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "check_parity", interrupted)
    assert main(["export", str(folder / "best.safetensors"), "--out", str(good)]) == 130
    monkeypatch.setattr(ex, "check_parity", real)
    real_open = ex.open_exported

    def noisy(path):  # an export that disagrees with headstart: its gate fails
        m = real_open(path)
        run_ = m.run
        m.run = lambda batch: run_(batch) + 0.5
        return m

    monkeypatch.setattr(ex, "open_exported", noisy)
    from headstart.export.gate import ParityError

    with pytest.raises(ParityError, match=f"nothing was written \\({good} is as it was\\)"):
        ex.export(folder / "best.safetensors", out=good)
    assert good.read_bytes() == xml and good.with_suffix(".bin").read_bytes() == bin_
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.bin", "good.xml", "notes"]


def test_train_into_a_users_folder_leaves_its_files_alone(tmp_path: Path, capsys) -> None:
    """Issue 25, 3: --out FOLDER, the user's own (not a run), had metrics.csv, summary.json... replaced."""
    data = make_dataset(tmp_path / "data")
    mine = tmp_path / "mine"
    _users_file(mine / "summary.json")
    _users_file(mine / "notes.txt")
    argv = ["train", str(data), "--out", str(mine), "--epochs", "1", "--strategy", "frozen", *TINY]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "is not a run folder, and it holds files of the names a run writes (summary.json)" in err
    assert (mine / "summary.json").read_bytes() == USERS and sorted(p.name for p in mine.iterdir()) == [
        "notes.txt", "summary.json"]
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((mine / "summary.json").read_text())["best_epoch"] >= 0
    assert (mine / "notes.txt").read_bytes() == USERS  # not a run's file: never removed
    # A folder of the user's with other files only is written into: nothing clashes.
    other = tmp_path / "other"
    _users_file(other / "notes.txt")
    assert main([*argv[:3], str(other), *argv[4:]]) == 0 and (other / "notes.txt").read_bytes() == USERS


def test_report_over_a_checkpoint_is_refused(run, tmp_path: Path, capsys) -> None:
    """Issue 25, 4: `report RUN --out runs/x/best.safetensors` replaced the checkpoint with HTML."""
    folder, _ = run
    ckpt = tmp_path / "best.safetensors"
    shutil.copy(folder / "best.safetensors", ckpt)
    assert main(["report", str(folder), "--out", str(ckpt)]) == 2
    assert "is not a report written by headstart" in capsys.readouterr().err
    assert ckpt.read_bytes() == (folder / "best.safetensors").read_bytes()
