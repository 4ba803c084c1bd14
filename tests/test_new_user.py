"""What a demanding new user's hour with the newer commands found (issue 25, items 7-17): crashes,
messages that did not help, and limits that differed between commands."""

from __future__ import annotations

import ast
import json
import socket
import struct
import subprocess
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, features

from headstart.cli import main
from headstart.data import list_images, open_image

from .conftest import TINY, colour_image, make_dataset
from .test_export_serve import Server, multipart, png, request


@pytest.fixture
def run(tiny_run: tuple[Path, Path]) -> tuple[Path, Path]:
    return tiny_run  # the session's tiny frozen run (conftest)


def bomb(side: int) -> bytes:
    """A PNG whose header says side x side pixels (its data is a few bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# 7. --nproc from a folder that holds a folder named `headstart`

def test_the_ranks_run_this_headstart_whatever_the_current_folder_holds(tmp_path: Path) -> None:
    from headstart.runtime.distributed import _self_command

    (tmp_path / "headstart").mkdir()
    (tmp_path / "headstart" / "__init__.py").write_text("")  # a folder of the user's that shadows the package
    done = subprocess.run([*_self_command(), "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("headstart "), done.stderr[-500:]


# 8. serve: options and the port checked before it says where it serves

def test_serve_checks_its_options_and_binds_before_it_says_it_serves(run, capsys) -> None:
    ckpt = str(run[0] / "best.safetensors")
    for argv, message in ((["--port", "70000"], "port 70000 is not a TCP port"),
                          (["--top-k", "0"], "top_k >= 1"), (["--max-batch", "0"], "max_batch >= 1"),
                          (["--max-upload", "0"], "max_upload must be at least 1 byte")):
        assert main(["serve", ckpt, *argv]) == 2, argv
        out, err = capsys.readouterr()
        assert message in err and "serving on" not in out, (argv, err)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", ckpt, "--port", str(port)]) == 2
        out, err = capsys.readouterr()
        assert f"cannot listen on 127.0.0.1:{port}" in err and "serving on" not in out


# 9. the library's predict given one path as a string

def test_predict_takes_one_folder_as_a_string(run) -> None:
    from headstart.infer.prediction import predict

    ckpt, data = run
    preds = predict(ckpt / "best.safetensors", str(data / "val" / "red"), workers=0)
    assert len(preds) == 6 and {p.label for p in preds} <= {"red", "blue", "unknown"}


# 10. export's messages

def test_export_says_what_is_wrong(run, tmp_path: Path, capsys) -> None:
    folder, _ = run
    (tmp_path / "empty").mkdir()
    assert main(["export", str(folder / "best.safetensors"), "--out", str(tmp_path / "m.onnx"), "--images",
                 str(tmp_path / "empty")]) == 2
    assert "no image files in" in capsys.readouterr().err
    assert main(["export", str(folder / "state.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "is a run's state (what `train --resume` continues from), not a model: use" in capsys.readouterr().err
    assert not any(tmp_path.glob("m.*"))


# 11. an unwritable HEADSTART_HOME

def test_an_unusable_cache_folder_is_said_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    data = make_dataset(tmp_path / "data")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("HEADSTART_HOME", str(tmp_path / "file" / "home"))
    assert main(["train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1", "--strategy", "finetune",
                 *TINY]) == 2
    out, err = capsys.readouterr()
    assert "HEADSTART_HOME=" in err and "cannot be" in err and "epoch 1" not in out
    assert not (tmp_path / "run" / "metrics.csv").exists()


# 12. the wall time says the work after training too

def test_the_wall_time_is_the_whole_run_and_says_the_training_apart(dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", str(dataset), "--out", str(tmp_path / "run"), "--epochs", "1", "--strategy", "finetune",
                 *TINY]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["training_s"] < summary["wall_time_s"]
    line = next(x for x in out.splitlines() if x.startswith("best val acc"))
    assert f"wall time {summary['wall_time_s']:.1f}s: training {summary['training_s']:.1f}s, then" in line


# 13. report on an interrupted run

def test_report_of_an_interrupted_run_says_to_resume_it(run, tmp_path: Path, capsys) -> None:
    folder, _ = run
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "state.safetensors").write_bytes((folder / "state.safetensors").read_bytes())
    assert main(["report", str(tmp_path / "cut")]) == 2
    assert f"headstart train --resume {tmp_path / 'cut'}" in capsys.readouterr().err


# 14. serve: an answer per file; one pixel limit everywhere

def test_serve_answers_each_file_of_a_request(run) -> None:
    server = Server(run[0] / "best.safetensors", engine="torch")
    try:
        body, ctype = multipart([("a.png", png()), ("notes.png", b"hello, not an image"), ("b.png", png(seed=3))])
        form = body.replace(b"--headstart-test-boundary--", b"--headstart-test-boundary\r\nContent-Disposition: "
                            b"form-data; name=\"comment\"\r\n\r\nsome text\r\n--headstart-test-boundary--")
        status, answer = request(server.url + "/predict", form, ctype)
        assert status == 200, answer
        files = [(p["file"], p.get("label"), p.get("status")) for p in answer["predictions"]]
        assert files == [("a.png", "red", None), ("notes.png", None, 415), ("b.png", "red", None)]
        assert "notes.png: not an image" in answer["predictions"][1]["error"]
        status, answer = request(server.url + "/predict", bomb(10_000), "image/png")  # 100 M pixels
        assert status == 413 and "over the limit of 89478485" in answer["error"]
    finally:
        server.close()


def test_the_pixel_limit_does_not_depend_on_warning_filters(monkeypatch) -> None:
    """Pillow only warns between 1x and 2x its guard; the check was a warnings filter, which is
    process-wide: a thread leaving its catch_warnings (serve decodes in threads) undid another's."""
    monkeypatch.setattr(warnings, "simplefilter", lambda *a, **k: None)  # as when another thread restored them
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        with pytest.raises(Image.DecompressionBombError, match="over the limit"):
            open_image(bomb(10_000))


# 15. check --labels --json

def test_check_json_holds_the_label_check(run, tmp_path: Path, monkeypatch, capsys) -> None:
    from headstart.analysis import labels

    _, data = run
    rows = [labels.LabelRow(str(data / "train" / "red" / "red_0.png"), "train", "red", "blue", 0.1, True),
            labels.LabelRow(str(data / "train" / "red" / "red_1.png"), "train", "red", "red", 0.9, False)]
    monkeypatch.setattr(labels, "find_label_issues", lambda *a, **k: rows)
    assert main(["check", str(data), "--labels", "--json", str(tmp_path / "c.json")]) == 0
    doc = json.loads((tmp_path / "c.json").read_text())
    assert doc["labels"]["suspects"] == 1 and [r["rank"] for r in doc["labels"]["images"]] == [1, 2]
    assert doc["labels"]["images"][0]["suggested"] == "blue" and doc["files"] == 36


# 16. smaller ones

@pytest.mark.skipif(not features.check("avif"), reason="this Pillow reads no AVIF")
def test_avif_images_are_read_where_pillow_reads_them(tmp_path: Path) -> None:
    colour_image((220, 40, 30)).save(tmp_path / "a.avif")
    assert list_images(tmp_path) == [tmp_path / "a.avif"]
    with open_image(tmp_path / "a.avif") as img:
        assert img.size == (48, 40)


def test_predict_follows_symlinked_folders(run, tmp_path: Path) -> None:
    from headstart.infer.prediction import predict

    ckpt, data = run
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "reds").symlink_to(data / "val" / "red", target_is_directory=True)
    (tmp_path / "photos" / "loop").symlink_to(tmp_path / "photos", target_is_directory=True)  # read once
    assert len(predict(ckpt / "best.safetensors", tmp_path / "photos", workers=0)) == 6


def test_val_split_with_train_and_val_folders_is_refused(dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["train", str(dataset), "--val-split", "0.2", "--out", str(tmp_path / "run"), *TINY]) == 2
    assert "has train/ and val/ folders: --val-split 0.2 would be ignored" in capsys.readouterr().err
    assert main(["check", str(dataset), "--val-split", "0.2"]) == 2
    assert "would be ignored" in capsys.readouterr().err


def test_more_ranks_than_cores_is_said(dataset: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    import headstart.runtime.distributed as d

    monkeypatch.setattr(d, "_cores", lambda: 2)
    with caplog.at_level("WARNING", logger="headstart"):
        d.warn_if_oversubscribed(9)
    assert "9 processes on 2 cores" in caplog.text


def test_a_run_folder_that_cannot_be_made_says_to_pass_out(tmp_path: Path, capsys, monkeypatch) -> None:
    data = make_dataset(tmp_path / "data")
    (tmp_path / "runs").write_text("a file where the runs folder would go")  # as a read-only parent would
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(data), "--epochs", "1", "--strategy", "finetune", *TINY]) == 2
    assert "Pass --out with a folder you can write" in capsys.readouterr().err


# 17. the suite on a machine without ../shared

def test_every_test_that_reads_shared_skips_without_it() -> None:
    """A test that names the shared datasets or photos carries `needs_shared` (itself, or its module),
    which skips it where ../shared is absent and fails it where CI requires it."""
    names = {"HYMENOPTERA", "FLOWERS12", "PHOTOS", "SHARED"}
    missing = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marked = any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in n.targets)
                            and "needs_shared" in ast.unparse(n.value) for n in tree.body)
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith(("test_", "_")):
                continue
            used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} & names
            marked = module_marked or any("needs_shared" in ast.unparse(d) for d in node.decorator_list)
            if used and node.name.startswith("test_") and not marked:
                missing.append(f"{path.name}::{node.name}")
    assert not missing, missing
