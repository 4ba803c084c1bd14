"""The dataset check: every planted problem is reported; training stops or skips as it should."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.analysis.check import check_dataset
from headstart.cli import main
from headstart.training import TrainConfig, train

from .conftest import HYMENOPTERA, colour_image, make_dataset, needs_shared


def _kinds(report) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for f in report.findings:
        for p in f.paths:
            out.setdefault(Path(p).name, set()).add(f.kind)
    return out


def plant(root: Path) -> dict[str, Path]:
    """One file of each kind of trouble, planted into a copy of a dataset with train/ants."""
    ants, val_ants = root / "train" / "ants", root / "val" / "ants"
    src = sorted(ants.glob("*.jpg"))[0]
    p = {}
    p["truncated"] = ants / "truncated.jpg"
    p["truncated"].write_bytes(src.read_bytes()[:2000])
    p["empty"] = ants / "empty.jpg"
    p["empty"].write_bytes(b"")
    p["text"] = ants / "notes.jpg"
    p["text"].write_text("this is text, not a JPEG")
    img = Image.open(src).convert("RGB")
    p["cmyk"] = ants / "cmyk.jpg"
    img.convert("CMYK").save(p["cmyk"])
    p["sixteen"] = ants / "sixteen.png"
    Image.fromarray((np.asarray(img.convert("L"), dtype=np.uint16) * 257)).save(p["sixteen"])
    p["rgba"] = ants / "rgba.png"
    img.convert("RGBA").save(p["rgba"])
    p["rotated"] = ants / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(p["rotated"], exif=exif)
    p["leak"] = val_ants / "copy_of_train.jpg"
    shutil.copy(src, p["leak"])
    (root / "train" / ".ipynb_checkpoints").mkdir()
    colour_image((1, 2, 3)).save(root / "train" / ".ipynb_checkpoints" / "x.png")
    p["hidden"] = root / "train" / ".ipynb_checkpoints"
    (root / "train" / "wasps").mkdir()
    p["empty_class"] = root / "train" / "wasps"
    p["source"] = src
    return p


@needs_shared
def test_placeholder_found_in_the_untouched_dataset() -> None:
    report = check_dataset(HYMENOPTERA)
    assert report.counts == {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    assert "placeholder" in _kinds(report)["imageNotFound.gif"]
    assert not report.blocking()


@pytest.mark.slow
@needs_shared
def test_every_planted_problem_is_reported_and_training_reacts(tmp_path: Path) -> None:
    root = tmp_path / "hym"
    shutil.copytree(HYMENOPTERA, root, ignore=shutil.ignore_patterns("MANIFEST.sha256"))
    p = plant(root)
    report = check_dataset(root)
    kinds = _kinds(report)
    expected = {
        "truncated": "unreadable", "empty": "unreadable", "text": "unreadable", "cmyk": "mode",
        "sixteen": "mode", "rgba": "mode", "rotated": "exif-rotated", "leak": "leakage", "hidden": "hidden",
        "empty_class": "empty-class",
    }
    for key, kind in expected.items():
        assert kind in kinds.get(p[key].name, set()), (key, kinds.get(p[key].name))
    assert "leakage" in kinds[p["source"].name]  # both copies are named
    assert "placeholder" in kinds["imageNotFound.gif"]
    reasons = {f.paths[0]: f.message for f in report.findings if f.kind == "unreadable"}
    assert "empty file" in reasons[str(p["empty"])] and "truncated" in reasons[str(p["truncated"])]
    assert {f.kind for f in report.blocking()} >= {"leakage", "empty-class"}
    assert report.findings[0].severity == "error"  # worst first

    # The CLI: non-zero while training would be wrong, zero when the errors are allowed.
    assert main(["check", str(root), "--json", str(tmp_path / "check.json")]) == 1
    assert json.loads((tmp_path / "check.json").read_text())["files"] == report.files
    assert main(["check", str(root), "--allow", "leakage,empty-class,class-missing"]) == 0

    # Training stops before it starts, naming the empty class folder...
    config = TrainConfig(arch="tiny", weights=None, strategy="finetune", epochs=1, image_size=32, workers=2)
    with pytest.raises(ValueError, match=str(p["empty_class"])):
        train(root, out=tmp_path / "run", config=config)
    # ... and without it trains to the end, naming each skipped file once.
    p["empty_class"].rmdir()
    messages = []

    import logging

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    logging.getLogger("headstart").addHandler(handler)
    try:
        result = train(root, out=tmp_path / "run", config=TrainConfig(**{**config.__dict__, "epochs": 2}))
    finally:
        logging.getLogger("headstart").removeHandler(handler)
    bad = {str(p[k]) for k in ("truncated", "empty", "text")}
    assert set(result.skipped) == bad
    for path in bad:
        assert sum(path in m for m in messages) == 1, (path, messages)
    assert len(result.history) == 2


def test_bad_files_fail_stops_before_training(dataset: Path, tmp_path: Path) -> None:
    (dataset / "train" / "red" / "zero.png").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.png.*empty file"):
        train(dataset, out=tmp_path / "run", config=TrainConfig(arch="tiny", weights=None, strategy="finetune",
                                                                epochs=1, workers=0, bad_files="fail"))


def test_duplicates_within_a_split_and_near_duplicates(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "d", per_class={"train": 4, "val": 2})
    a = root / "train" / "red" / "red_0.png"
    shutil.copy(a, root / "train" / "blue" / "same_bytes.png")  # same image, other label
    img = Image.open(a).convert("RGB")
    img.resize((96, 80)).save(root / "val" / "red" / "bigger.jpg", quality=95)  # near-identical, other split
    report = check_dataset(root, image_size=32)
    kinds = _kinds(report)
    assert "duplicate" in kinds["same_bytes.png"]
    assert "leakage" in kinds["bigger.jpg"]
    dup = next(f for f in report.findings if f.kind == "duplicate")
    assert "different labels" in dup.message


def test_the_near_duplicate_search_compares_near_linearly_many_pairs_and_misses_none() -> None:
    """Issue 25, 18: the search compared every pair (64,000 images: 137 s). Keys of 4 of 8 blocks of the
    64-bit hash: the pairs compared grow about as the near pairs do, and every pair within 4 bits is
    found (checked against comparing every pair, on 3,000 hashes)."""
    import numpy as np

    from headstart.analysis.files import near_pairs

    rng = np.random.default_rng(0)

    def hashes(n: int) -> np.ndarray:  # random hashes; a tenth are copies of others with 1-4 bits flipped
        h = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
        copies = rng.integers(0, n - n // 10, n // 10)
        for k, src in enumerate(copies):
            flipped = int(h[src])
            for bit in rng.choice(64, int(rng.integers(1, 5)), replace=False):
                flipped ^= 1 << int(bit)
            h[n - n // 10 + k] = flipped
        return h

    counts = {}
    for n in (2000, 8000, 32000):
        pairs, compared = near_pairs(hashes(n), 4)
        counts[n] = compared
        assert len(pairs) >= n // 10 and compared < 1.2 * len(pairs) + 10
    growth = np.log(counts[32000] / counts[2000]) / np.log(16)
    assert growth < 1.1, counts  # (every pair: 2.0)
    h = hashes(3000)
    brute = set()
    for i in range(len(h) - 1):  # every pair: popcount of the XOR with each later hash
        bits = np.unpackbits(np.bitwise_xor(h[i + 1:], h[i]).view(np.uint8).reshape(-1, 8), axis=1).sum(1)
        brute |= {(i, int(j) + i + 1) for j in np.flatnonzero(bits <= 4)}
    found = {tuple(sorted(p)) for p in near_pairs(h, 4)[0]}
    assert found == brute
