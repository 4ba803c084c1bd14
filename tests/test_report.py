"""The run report: self-contained HTML with every section; re-rendered and compared from run folders;
checked in a real headless browser (Debian's chromium) when one is installed, as CI does."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from headstart.cli import main
from headstart.training import TrainConfig, train

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
SECTIONS = ["Dataset", "Curves", "Per-class metrics and confusion matrix", "Most confidently wrong",
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
    assert len(images) == 3 and all(src.startswith("data:image/png;base64,") for src in images)
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


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]


def test_report_renders_in_headless_chromium(runs, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        if os.environ.get("HEADSTART_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (HEADSTART_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    page = runs[0] / "report.html"
    profile = tmp_path / "profile"
    dom = subprocess.run([browser, *CHROME_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-images-ok="true"' in dom.stdout and 'data-images="3"' in dom.stdout, dom.stdout[:500]
    for section in SECTIONS:
        assert section in dom.stdout
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report.png"
    subprocess.run([browser, *CHROME_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2600",
                    f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
