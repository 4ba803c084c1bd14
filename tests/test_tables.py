"""Labels from a table (.csv, .tsv): the same run as the folders, and every bad table named by its row."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from headstart.analysis.check import check_dataset
from headstart.cli import main
from headstart.data import Columns, scan_dataset
from headstart.infer.evaluation import evaluate
from headstart.io.checkpoint import read_checkpoint
from headstart.training import TrainConfig, resume, train

from .conftest import colour_image, make_dataset


def write_table(path: Path, rows: list[list[str]], header: list[str], *, delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def table_of(data: Path, table: Path, *, split: str | None = "split", absolute: bool = False) -> Path:
    """A table listing a folder dataset's files with their labels, in an order of its own (reversed)."""
    rows = []
    for image in sorted(data.rglob("*.png"), reverse=True):
        rel = image.relative_to(data)
        path = str(image) if absolute else str(Path(data.name) / rel) if table.parent == data.parent else str(rel)
        row = [path, rel.parts[-2]]
        if split == "split":
            row.append({"train": "train", "val": "valid"}[rel.parts[0]])
        elif split == "is_valid":
            row.append("True" if rel.parts[0] == "val" else "False")
        rows.append(row)
    header = ["Image", "Label"] + ([split] if split else [])
    return write_table(table, rows, header, delimiter="\t" if table.suffix == ".tsv" else ",")


def config(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(arch="tiny", weights=None, strategy="frozen", epochs=2, batch_size=8, lr=0.05,
                                 workers=0, seed=3), **kw})


def weights(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(run / "best")[0]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_table_of_a_folders_files_trains_the_same_run_as_the_folders(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    folders = train(data, out=tmp_path / "folders", config=config())
    table = train(table_of(data, tmp_path / "labels.csv"), out=tmp_path / "table", config=config())
    assert table.best_val_acc == folders.best_val_acc and same_weights(tmp_path / "folders", tmp_path / "table")
    assert [r.train_loss for r in table.history] == [r.train_loss for r in folders.history]
    # no split column: --val-split splits it as it splits a folder of class folders (seeded, stratified)
    flat = tmp_path / "flat"
    for image in data.rglob("*.png"):
        (flat / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, flat / image.parent.name / f"{image.parts[-3]}_{image.name}")
    rows = [[f"{p.parent.name}/{p.name}", p.parent.name] for p in sorted(flat.rglob("*.png"))]
    tsv = write_table(flat / "labels.tsv", rows, ["file", "class"], delimiter="\t")
    a = scan_dataset(flat, val_split=0.25, seed=3)
    b = scan_dataset(tsv, val_split=0.25, seed=3)
    assert (a.classes, a.train, a.val) == (b.classes, b.train, b.val)
    # evaluate reads the table's val rows; fastai's is_valid column works as a split column
    ckpt = tmp_path / "folders" / "best.safetensors"
    on_folders = evaluate(ckpt, data, workers=0, precision="fp32")
    on_table = evaluate(ckpt, table_of(data, tmp_path / "valid.csv", split="is_valid", absolute=True), workers=0,
                        precision="fp32")
    assert on_table.n == on_folders.n == 12 and on_table.accuracy == on_folders.accuracy


def test_the_cli_trains_shows_checks_and_evaluates_a_table(tmp_path: Path, capsys, monkeypatch) -> None:
    data = make_dataset(tmp_path / "data")
    table = write_table(tmp_path / "t.csv", [[str(p.relative_to(tmp_path)), p.parent.name,
                                              "train" if "train" in p.parts else "val"]
                                             for p in sorted(data.rglob("*.png"))], ["where", "what", "split"])
    monkeypatch.chdir(tmp_path)
    named = ["--path-column", "where", "--label-column", "what"]
    assert main(["check", str(table), *named]) == 0
    assert f"{table}: 36 image files, 2 classes" in capsys.readouterr().out
    assert main(["show", str(table), *named, "--out", str(tmp_path / "batch.png"), "--image-size", "32"]) == 0
    assert (tmp_path / "batch.png").stat().st_size > 0
    assert main(["train", "t.csv", *named, "--arch", "tiny", "--weights", "none", "--strategy", "frozen",
                 "--epochs", "1", "--workers", "0", "--batch-size", "8"]) == 0
    run = tmp_path / "runs" / "t-tiny-frozen"  # named after the table
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["path_column"] == "where" and summary["counts"]["val"] == {"blue": 6, "red": 6}
    capsys.readouterr()
    assert main(["evaluate", str(run / "best.safetensors"), "t.csv", *named, "--workers", "0"]) == 0
    assert "images: 12" in capsys.readouterr().out
    assert main(["export", str(run / "best.safetensors"), "--out", str(tmp_path / "m.onnx")]) == 0  # (its run's split)
    assert f"parity on 12 images (the run's validation images, {table.name})" in capsys.readouterr().out
    assert main(["check", str(table)]) == 2  # its columns are not found by their header
    assert "no column named path or file or image or filename" in capsys.readouterr().err


def test_a_bad_table_is_an_error_that_names_the_row_and_the_fix(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 3, "val": 2})
    good = [[f"data/{p.relative_to(data)}", p.parent.name, p.parts[-3]] for p in sorted(data.rglob("*.png"))]
    header = ["path", "label", "split"]

    def error(rows: list[list[str]], *, head: list[str] = header, **kw) -> str:
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            scan_dataset(write_table(tmp_path / "t.csv", rows, head), **kw)
        return str(e.value)

    assert "no column 'file' (--path-column); its columns: path, label, split" in error(
        good, columns=Columns(path="file"))
    assert "no column named label or class or category" in error([r[:1] + r[2:] for r in good],
                                                                 head=["path", "split"])
    assert "row 3: data/train/blue/blue_1.png has an empty label (column 'label')" in error(
        [good[0], [good[1][0], "", "train"], *good[2:]])
    outside = [["../elsewhere.png", "red", "train"], *good]
    assert "row 2: ../elsewhere.png leaves the table's folder" in error(outside)
    assert "--allow-outside" in error(outside)
    allowed = scan_dataset(write_table(tmp_path / "t.csv", outside, header), columns=Columns(allow_outside=True))
    assert tmp_path.parent / "elsewhere.png" in [s.path for s in allowed.train]  # (then skipped: no such file)
    assert "row 12: class 'green' is in val but no train row has it" in error([*good, ["data/val/green.png", "green",
                                                                                      "val"]])
    assert "split is 'test', not one of train, val, valid, validation" in error([*good[:-1], [*good[-1][:2], "test"]])
    twice = error([*good, ["data/train/blue/blue_0.png", "red", "train"]])
    assert "rows 2 and 12: " in twice and "blue_0.png is listed twice, with label 'blue' and 'red'" in twice
    assert "has no split column; to hold out a fifth" in error([r[:2] for r in good], head=["path", "label"])
    assert "a split column: --val-split 0.2 would be ignored" in error(good, val_split=0.2)
    assert "labels every image 'red'" in error([[r[0], "red", r[2]] for r in good])
    assert "is a folder: --path-column" in str(pytest.raises(ValueError, scan_dataset, data,
                                                             columns=Columns(path="x")).value)


def test_missing_and_unreadable_files_are_skipped_or_stop_the_run_as_in_folders(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    table = table_of(data, tmp_path / "t.csv")
    (data / "train" / "red" / "red_0.png").unlink()
    (data / "train" / "blue" / "blue_0.png").write_bytes(b"not an image")
    result = train(table, out=tmp_path / "skip", config=config(epochs=1))
    assert sorted(Path(p).name for p in result.skipped) == ["blue_0.png", "red_0.png"]
    with pytest.raises(ValueError, match="2 file\\(s\\) cannot be read as images \\(bad_files='fail'\\)"):
        train(table, out=tmp_path / "fail", config=config(epochs=1, bad_files="fail"))


def test_check_finds_each_problem_planted_in_a_table(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 4, "val": 2})
    rows = [[f"data/{p.relative_to(data)}", p.parent.name, p.parts[-3]] for p in sorted(data.rglob("*.png"))]
    (data / "train" / "red" / "broken.png").write_bytes(b"\x89PNG broken")
    colour_image((0, 200, 0), seed=99).save(data / "val" / "red" / "green.png")
    rows += [["data/train/red/gone.png", "red", "train"],  # missing
             ["data/train/red/broken.png", "red", "train"],  # unreadable
             ["data/train/blue/blue_1.png", "red", "train"],  # listed again with another label
             ["data/train/blue/blue_2.png", "blue", "val"],  # in train and in val
             ["data/train/blue/blue_3.png", "blue", "train"],  # the same row again
             ["data/val/red/green.png", "green", "val"]]  # a class val has and train has not
    report = check_dataset(write_table(tmp_path / "t.csv", rows, ["path", "label", "split"]))
    kinds = {f.kind: f for f in report.findings}
    assert kinds["missing"].paths == [f"{tmp_path / 'data/train/red/gone.png'} (row 14)"]
    assert kinds["unreadable"].paths == [str(tmp_path / "data/train/red/broken.png")]
    assert kinds["conflicting-labels"].severity == "error"
    assert kinds["conflicting-labels"].paths[0].endswith("blue_1.png (rows 3 and 16)")
    assert kinds["leakage"].paths[0].endswith("blue_2.png (rows 4 and 17)")
    assert kinds["listed-twice"].paths[0].endswith("blue_3.png (rows 5 and 18)")
    assert "class 'green' is missing from train" in kinds["class-missing"].message
    assert {f.kind for f in report.blocking()} >= {"conflicting-labels", "leakage", "class-missing"}
    assert report.counts["train"]["red"] == 5  # red_0..3 and broken.png: what is there to read


def test_resume_refuses_a_table_changed_since_the_run_started(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    table = table_of(data, tmp_path / "t.csv")
    train(table, out=tmp_path / "run", config=config(epochs=1))
    listing = json.loads((tmp_path / "run" / "dataset.json").read_text())
    assert len(listing["table"]) == 64 and listing["train"][0][0] == "data/train/blue/blue_0.png"
    text = table.read_text().replace("blue_0.png,blue", "blue_0.png,red", 1)
    table.write_text(text)
    with pytest.raises(ValueError, match="changed since the run .* started: the table .* itself"):
        resume(tmp_path / "run", epochs=2)


def test_tables_as_spreadsheets_and_other_systems_write_them(tmp_path: Path, monkeypatch) -> None:
    """Cells past the header and rows of empty cells, Windows separators, one file spelled two ways,
    a table that is not UTF-8, and `similar` on a table's training rows."""
    from headstart.infer.similar import find_similar

    data = make_dataset(tmp_path / "data", per_class={"train": 3, "val": 2})
    good = [[f"data\\{p.parts[-3]}\\{p.parts[-2]}\\{p.name}", p.parent.name, p.parts[-3]]
            for p in sorted(data.rglob("*.png"))]  # written on Windows
    table = write_table(tmp_path / "t.csv", [*good[:2], ["", "", "", "a note"], [*good[2], "x"], *good[3:]],
                        ["path", "label", "split"])
    splits = scan_dataset(table)
    assert len(splits.train) == 6 and all(s.path.is_file() for s in splits.train + splits.val)
    monkeypatch.chdir(tmp_path)  # one file, relative and absolute: listed twice, with two labels
    twice = write_table(tmp_path / "twice.csv", [*good, [str(data / "train" / "blue" / "blue_0.png"), "red", "train"]],
                        ["path", "label", "split"])
    with pytest.raises(ValueError, match="is listed twice, with label 'blue' and 'red'"):
        scan_dataset("twice.csv")
    assert "conflicting-labels" in {f.kind for f in check_dataset(twice).findings}
    (tmp_path / "latin.csv").write_bytes("path,label,split\ndata/train/blue/blue_0.png,bl\xe9,train\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv is not UTF-8 text .* save it as CSV UTF-8"):
        scan_dataset(tmp_path / "latin.csv")
    (tmp_path / "empty.csv").write_text("path,label,split\n")
    assert {f.kind for f in check_dataset(tmp_path / "empty.csv").blocking()} == {"no-classes"}
    train(table, out=tmp_path / "run", config=config(epochs=1))
    found = find_similar(tmp_path / "run" / "best.safetensors", [data / "val" / "red" / "red_0.png"], data=table, k=2,
                         workers=0)
    assert len(found[0].nearest) == 2 and all("/train/" in n.path for n in found[0].nearest)
