"""Files in the user's cache: where they live, how they are written, how they are downloaded.

Everything headstart keeps between runs goes under `cache_dir()` ($HEADSTART_HOME, default
~/.cache/headstart). Every file there is written atomically: to a temporary file in the same
folder, fsync'ed, then renamed, so a killed process never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)


def cache_dir() -> Path:
    """$HEADSTART_HOME, else ~/.cache/headstart (created on first use)."""
    root = Path(os.environ.get("HEADSTART_HOME") or Path.home() / ".cache" / "headstart").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync it and rename it onto `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from e
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, ConnectionError):
            raise _write_error(path, e) from e
        raise


def _write_error(path: Path, e: OSError) -> OSError:
    """The same kind of OSError, with a message that names the file, what was kept, and the fix."""
    reason = e.strerror or str(e)
    return type(e)(e.errno, f"could not write {path}: {reason}. Any earlier version of it is intact; free "
                            "some space, fix the folder's permissions, or write elsewhere (e.g. --out)")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ChecksumError(ValueError):
    """A file's sha256 is not the expected one."""


def check_sha256(actual: str, expected: str | None, what: str) -> None:
    """`expected` is a full hex digest or a prefix of at least 8 characters (torchvision's file
    names carry one); None skips the check."""
    if expected is None:
        return
    expected = expected.lower()
    if len(expected) < 8 or not actual.startswith(expected):
        raise ChecksumError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}. The file is corrupt or "
            "not the one expected; it was not kept. Retry, or check the source."
        )


def download(url: str, dest: str | os.PathLike[str], *, sha256: str | None = None,
             progress: Progress | None = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest`, checking the size and sha256 before an atomic move into place.

    Raises ConnectionError for network failures and interrupted transfers, ChecksumError (a
    ValueError) for a checksum mismatch; in every failure no file is left at `dest`.
    """
    dest = Path(dest)
    log.info("downloading %s -> %s", url, dest)
    h = hashlib.sha256()
    done = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = resp.headers.get("Content-Length")
            total = int(total) if total is not None else None
            with atomic_write(dest) as f:
                while block := resp.read(1 << 16):
                    f.write(block)
                    h.update(block)
                    done += len(block)
                    if progress:
                        progress(done, total)
                if total is not None and done != total:
                    raise ConnectionError(
                        f"download of {url} was interrupted: got {done} of {total} bytes; run again to retry"
                    )
                check_sha256(h.hexdigest(), sha256, url)
    except (ChecksumError, ConnectionError):
        raise
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(
            f"could not download {url}: {e}. Check the network, or download the file by hand and "
            "pass its path instead"
        ) from e
    except http.client.HTTPException as e:  # IncompleteRead: the server closed mid-transfer
        raise ConnectionError(f"download of {url} was interrupted: {e!r}; run again to retry") from e
    return dest
