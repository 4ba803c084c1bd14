"""Where a command writes a file: never over a file of the user's, never half a file.

Every file a command writes for the user (an export, a report, a picture, a JSON or CSV of results, a
converted checkpoint; a run folder's files go through `runfolder.claim_run_folder`, which follows the
same rule for the folder) goes through this module:

- `claim(path, kind)` before any work: where `path` holds a file that is not a file of `kind` written
  by headstart (an export replaces a headstart export, `report` a headstart report...), the command is
  refused with FileExistsError naming the file, what it holds and `--overwrite`. A refused command
  has done nothing yet.
- `staged(path, kind)` / `write_output(path, kind)`: the command writes to a temporary name beside
  `path`; only when the block ends normally (for an export: after its gate passed) is it renamed into
  place. On any failure, Ctrl-C included, the temporary files are removed and `path` keeps what it held.
  Nothing is ever removed that the command did not create (or was told to replace).

A kind knows its own files by what headstart writes into them: the "headstart" metadata of an export,
the generator line of a report, the "Software" text of a PNG, the "written_by" key of a JSON, the
header of a CSV, the format of a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator

from headstart.io.download import atomic_write, umask

GENERATOR = "headstart"  # what headstart writes into its files' "generator"/"Software" fields


@dataclass(frozen=True)
class Kind:
    """A kind of file a command writes: its name (for messages), how to tell one headstart wrote,
    and the files that go with it (OpenVINO's .bin beside the .xml)."""

    name: str
    recognise: Callable[[Path], bool]
    companions: Callable[[Path], list[Path]] = lambda path: []  # the files written beside `path`

    def files(self, path: Path) -> list[Path]:
        return [path, *self.companions(path)]


def _head(path: Path, n: int = 4096) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _is_report(path: Path) -> bool:
    return f'<meta name="generator" content="{GENERATOR}'.encode() in _head(path)


def _is_picture(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.format == "PNG" and str(img.info.get("Software", "")).startswith(GENERATOR)
    except Exception:  # noqa: BLE001  (not an image, unreadable: not ours)
        return False


def json_by(command: str) -> Callable[[Path], bool]:
    """A JSON object written by `headstart COMMAND` (its "written_by" key)."""
    def recognise(path: Path) -> bool:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and str(doc.get("written_by", "")).startswith(f"{GENERATOR} {command}")
    return recognise


def csv_with_header(header: list[str]) -> Callable[[Path], bool]:
    """A CSV whose first line is `header` (the table a headstart command writes)."""
    line = ",".join(header).encode()
    return lambda path: _head(path, len(line) + 2).splitlines()[:1] == [line]


def _is_onnx_export(path: Path) -> bool:
    try:
        import onnx

        return any(p.key == "headstart" for p in onnx.load(str(path), load_external_data=False).metadata_props)
    except Exception:  # noqa: BLE001  (not ONNX, onnx missing: not known to be ours)
        return False


def _is_openvino_export(path: Path) -> bool:
    # OpenVINO writes rt_info at the end of the .xml: <rt_info><headstart><metadata value="..."/>
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 65536))
            tail = f.read()
    except OSError:
        return False
    return b"<rt_info>" in tail and b"<headstart>" in tail


REPORT = Kind("a report written by headstart", _is_report)
PICTURE = Kind("a picture written by headstart", _is_picture)
ONNX_EXPORT = Kind("an ONNX export written by headstart", _is_onnx_export)
OPENVINO_EXPORT = Kind("an OpenVINO export written by headstart", _is_openvino_export,
                       companions=lambda p: [p.with_suffix(".bin")])


def _holds(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def claim(path: str | os.PathLike[str], kind: Kind, *, overwrite: bool = False) -> Path:
    """`path` for a new file of `kind`; FileExistsError where it (or a companion) holds something
    that is not a headstart `kind`, unless `overwrite`. Writes nothing."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; name a file to write")
    if overwrite:
        return path
    ours = _holds(path) and kind.recognise(path)
    for f in kind.files(path):
        if _holds(f) and not ours:
            raise FileExistsError(f"{f} exists and is not {kind.name}: it is left as it is. "
                                  "Write elsewhere, or pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def staged(path: str | os.PathLike[str], kind: Kind, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary path beside `path` (same suffix) to write a file of `kind` and its companions
    to; when the block ends normally they are renamed into place, else removed (Ctrl-C too).
    `claim` is checked first, and again before the rename (another process may have written there).

    Companions (OpenVINO's .bin) are renamed first, the main file (the .xml) last, after the old main
    file has been removed: a crash between the renames leaves no main file, so no reader ever opens a
    new .bin with an old .xml; the export is then simply missing, and running it again writes it."""
    path = claim(path, kind, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        claim(path, kind, overwrite=overwrite)
        for made in kind.files(tmp):
            os.chmod(made, 0o666 & ~umask())
        if len(kind.files(path)) > 1:
            path.unlink(missing_ok=True)
        for made, final in list(zip(kind.files(tmp), kind.files(path)))[::-1]:
            os.replace(made, final)
    finally:
        for made in kind.files(tmp):
            made.unlink(missing_ok=True)


@contextlib.contextmanager
def write_output(path: str | os.PathLike[str], kind: Kind, *, mode: str = "wb",
                 overwrite: bool = False) -> Iterator[IO]:
    """An open file to write a whole file of `kind` into; see `claim` and `atomic_write`."""
    path = claim(path, kind, overwrite=overwrite)
    with atomic_write(path, mode) as f:
        yield f
