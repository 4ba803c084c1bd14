"""The run report: self-contained HTML with every section; re-rendered and compared from run folders;
checked in a real headless browser (Debian's chromium) when one is installed, as CI does."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from headstart.cli import main
from headstart.training import TrainConfig, train

from .conftest import CHROME_FLAGS, chromium, rendered_dom

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SECTIONS = ["Dataset", "Curves", "Per-class metrics and confusion matrix", "Most confidently wrong",
            "Confidence and unknown images",
            "Predictions (blue right, red wrong)", "Timing", "Configuration"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    from .conftest import make_dataset

    root = tmp_path_factory.mktemp("rep")
    data = make_dataset(root / "data")
    (data / "train" / "red" / "broken.jpg").write_bytes(b"not a jpeg at all")
    base = dict(arch="tiny", weights=None, epochs=2, batch_size=8, lr=0.05, workers=0)
    a = train(data, out=root / "finetune", config=TrainConfig(**base, strategy="finetune"))
    b = train(data, out=root / "frozen", config=TrainConfig(**base, strategy="frozen"))
    return a.out, b.out


def test_train_writes_a_self_contained_report(runs) -> None:
    html = (runs[0] / "report.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{section}" in html, section
    assert "broken.jpg" in html  # the skipped file is listed
    images = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(images) == 4 and all(src.startswith("data:image/png;base64,") for src in images)
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing outside the file
    assert (runs[0] / "predictions.csv").read_text().startswith("path,true,predicted,probability,loss")


def test_report_command_rerenders_and_compares(runs, tmp_path: Path, capsys) -> None:
    (runs[0] / "report.html").unlink()
    assert main(["report", str(runs[0])]) == 0
    assert (runs[0] / "report.html").is_file()
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "cmp.html")]) == 0
    cmp = (tmp_path / "cmp.html").read_text()
    assert "finetune" in cmp and "frozen" in cmp and "best val acc" in cmp
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_report_renders_in_headless_chromium(runs, tmp_path: Path) -> None:
    page = runs[0] / "report.html"
    dom = rendered_dom(page, tmp_path / "profile")
    assert 'data-images-ok="true"' in dom and 'data-images="4"' in dom, dom[:500]
    for section in SECTIONS:
        assert section in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run([chromium(), *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
