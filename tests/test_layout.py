"""The layout stays readable: the import contract in pyproject.toml (layers, no cycle, imports under
TYPE_CHECKING counted) holds, and no module grows past 400 lines. Fast: reads source files only."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 400


def lint_imports() -> str:
    """The `lint-imports` beside this interpreter (or on PATH); a failure where it is not installed."""
    found = Path(sys.executable).with_name("lint-imports")
    command = str(found) if found.exists() else shutil.which("lint-imports")
    if not command:
        pytest.fail("lint-imports is not installed: `pip install -e '.[test]'` (setup.sh) installs import-linter")
    return command


def test_the_import_contract_holds() -> None:
    """`lint-imports` (import-linter, a test dependency) checks pyproject.toml's contracts."""
    command = lint_imports()
    done = subprocess.run([command, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_the_contract_catches_a_cycle_and_an_upward_import(tmp_path: Path) -> None:
    """The contract is not vacuous: a copy of the package with an import under TYPE_CHECKING that goes
    up a layer, and one that closes a cycle between two data modules, breaks both contracts."""
    command = lint_imports()
    shutil.copytree(ROOT / "headstart", tmp_path / "headstart", ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    up = "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import headstart.infer.classifier\n"
    with open(tmp_path / "headstart" / "io" / "checkpoint.py", "a") as f:
        f.write(up)
    with open(tmp_path / "headstart" / "data" / "tables.py", "a") as f:
        f.write("\nimport headstart.data.folders\n")
    done = subprocess.run([command, "--config", str(tmp_path / "pyproject.toml")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(tmp_path), "PATH": ""})
    assert done.returncode != 0
    assert "0 kept, 2 broken" in done.stdout, done.stdout[-3000:]
    assert "headstart.io.checkpoint -> headstart.infer.classifier" in done.stdout
    assert ".tables -> .folders" in done.stdout


def test_no_module_is_over_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "headstart").rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them along what they do): {long}"
