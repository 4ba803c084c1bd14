"""Shared fixtures: tiny generated datasets, a private cache folder, paths to the shared data."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared"
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
FLOWERS12 = SHARED / "datasets" / "flowers12"
PHOTOS = SHARED / "photos"


def require_shared() -> Path:
    """../shared beside the clone (the real datasets and photos): a test that reads it is skipped where
    it is absent (a user's fresh clone), and fails where CI requires it (HEADSTART_REQUIRE_SHARED).
    Module fixtures that read it call this themselves (they are set up before a test's own fixtures)."""
    missing = [p for p in (HYMENOPTERA, FLOWERS12, PHOTOS) if not p.is_dir()]
    if missing:
        if os.environ.get("HEADSTART_REQUIRE_SHARED"):
            pytest.fail(f"{missing[0]} is required here (HEADSTART_REQUIRE_SHARED) but not there")
        pytest.skip(f"{missing[0]} is not here: the real datasets and photos live in ../shared beside the clone")
    return SHARED


@pytest.fixture
def shared_data() -> Path:
    """../shared, or a skip (see require_shared)."""
    return require_shared()


needs_shared = pytest.mark.usefixtures("shared_data")  # a test (or a module's pytestmark) that reads ../shared


def colour_image(colour: tuple[int, int, int], size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    """A noisy image around `colour`: easy to tell apart by colour, not identical to its siblings."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(colour)[None, None] + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


CLASS_COLOURS = {"blue": (30, 40, 220), "red": (220, 40, 30)}


def make_dataset(root: Path, *, per_class: dict[str, int] | None = None, classes: dict | None = None) -> Path:
    """root/{train,val}/{red,blue}/*.png, small noisy images whose class is their colour."""
    classes = classes or CLASS_COLOURS
    per_class = per_class or {"train": 12, "val": 6}
    n = 0
    for split, count in per_class.items():
        for name, colour in classes.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                colour_image(colour, seed=n).save(d / f"{name}_{i}.png")
                n += 1
    return root


TINY = ["--arch", "tiny", "--weights", "none", "--batch-size", "8", "--lr", "0.05", "--workers", "0"]  # CLI flags


def tiny_frozen_run(root: Path) -> tuple[Path, Path]:
    """(run folder, dataset): the tiny model's head trained on frozen features of a generated dataset,
    all under `root` (its own cache too): one run that a module's tests share."""
    from headstart.training import TrainConfig, train

    data = make_dataset(root / "data")
    mp = pytest.MonkeyPatch()
    mp.setenv("HEADSTART_HOME", str(root / "home"))
    try:
        train(data, out=root / "run", config=TrainConfig(arch="tiny", weights=None, strategy="frozen", epochs=2,
                                                         batch_size=8, lr=0.05, workers=0))
    finally:
        mp.undo()
    return root / "run", data


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, dataset) of one tiny frozen run (`tiny_frozen_run`) for the whole session: the
    tests that only need a trained model share it, and read it (they write elsewhere)."""
    return tiny_frozen_run(tmp_path_factory.mktemp("tiny-run"))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(autouse=True)
def headstart_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test gets its own cache, except the real weights, which are shared across the session."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HEADSTART_HOME", str(home))
    random.seed(0)
    from headstart.analysis import linear

    linear._REMEMBERED.clear()  # each test solves its own fits (within a test, a fit asked again is read back)
    return home


@pytest.fixture(scope="session")
def real_weights_home() -> Path:
    """The cache that holds the real ImageNet weights: the user's (or CI's) own, so they are fetched
    and converted once per machine, not once per test run."""
    home = Path(os.environ.get("HEADSTART_TEST_HOME") or Path.home() / ".cache" / "headstart")
    home.mkdir(parents=True, exist_ok=True)
    return home


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]


def needs_nncf() -> None:
    """int8 tests: skip without NNCF (fail where CI requires it). Looked up, not imported: importing
    it before headstart imports OpenVINO would let OpenVINO's telemetry module load."""
    import importlib.util

    if importlib.util.find_spec("nncf") is None:
        if os.environ.get("HEADSTART_REQUIRE_NNCF"):
            pytest.fail("nncf is required here (HEADSTART_REQUIRE_NNCF) but not installed")
        pytest.skip("nncf is not installed (setup.sh installs it: the int8 extra)")


def chromium() -> str:
    """The headless browser for page tests; fails where CI requires one, else skips."""
    import shutil

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("HEADSTART_REQUIRE_CHROMIUM"):
            pytest.fail("chromium is required here (HEADSTART_REQUIRE_CHROMIUM) but not installed")
        pytest.skip("chromium is not installed (CI installs it: apt-get install chromium)")
    return browser


def rendered_dom(page: Path, profile: Path) -> str:
    """The DOM of a local page after its scripts ran, from headless Chromium."""
    import subprocess

    out = subprocess.run([chromium(), *CHROME_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
