"""Each image file's checks for `headstart check` (check.py): readable, its size and mode, a likely
placeholder; and the duplicates among them. Near-identical images are found with a 64-bit
difference hash (dHash: 9x8 greyscale, one bit per horizontal gradient); two images whose hashes
differ in at most `near_bits` bits are near-identical. Cost: one decode per image, at a reduced
JPEG scale (398 hymenoptera files: 1.6 s, about 4 ms a file, here).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from headstart.data import IMAGE_ERRORS, open_image
from headstart.data.images import to_rgb
from headstart.data.transforms import oriented_size

PLACEHOLDER_NAME = re.compile(r"(not.?found|placeholder|missing|no.?image|unavailable|default)", re.I)


@dataclass
class Finding:
    severity: str  # error | warning | info
    kind: str
    message: str
    paths: list[str] = field(default_factory=list)


@dataclass
class FileInfo:
    path: Path
    split: str
    cls: str
    size_bytes: int = 0
    sha256: str = ""
    error: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    exif_rotated: bool = False
    dhash: int | None = None
    colours: int | None = None  # distinct colours in a 64x64 thumbnail (photos have thousands)


# ---------------------------------------------------------------------------------------------
# One file.

def dhash(img: Image.Image) -> int:
    """64-bit difference hash of an image (any mode)."""
    g = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def inspect_file(info: FileInfo, *, full: bool = True) -> FileInfo:
    """Fill in what one file is: size, hash, decodability, mode, orientation, dHash, colours.
    With `full=False` only the header is read (fast: catches empty files and non-images)."""
    try:
        data = info.path.read_bytes() if full else b""
        info.size_bytes = len(data) if full else info.path.stat().st_size
    except OSError as e:
        info.error = f"cannot read: {e.strerror or e}"
        return info
    if info.size_bytes == 0:
        info.error = "empty file (0 bytes)"
        return info
    info.sha256 = hashlib.sha256(data).hexdigest() if full else ""
    try:
        with open_image(data if full else info.path) as img:  # the bytes already read
            info.mode = img.mode
            info.width, info.height = oriented_size(img)
            try:
                info.exif_rotated = img.getexif().get(0x0112, 1) not in (1, None)
            except Exception:
                info.exif_rotated = False
            if not full:
                return info
            if img.format == "JPEG":
                img.draft(img.mode, (64, 64))
            img.load()
            rgb = to_rgb(img)  # as training sees it: 16-bit and float images scaled, not clipped to white
            info.dhash = dhash(rgb)
            thumb = rgb.resize((64, 64), Image.Resampling.NEAREST)
            info.colours = len(thumb.getcolors(64 * 64) or [])
    except Image.DecompressionBombError as e:
        info.error = f"too large: {e}"
    except IMAGE_ERRORS as e:
        reason = str(e)
        if "truncated" in reason.lower():
            reason = f"truncated ({reason})"
        info.error = f"cannot decode: {type(e).__name__}: {reason}"
    return info


def file_findings(files: list[FileInfo], image_size: int) -> list[Finding]:
    out = []
    bad = [f for f in files if f.error]
    for f in bad:
        kind = "too-large" if f.error.startswith("too large") else "unreadable"
        out.append(Finding("warning", kind, f"{f.error}; skipped in training", [str(f.path)]))
    ok = [f for f in files if not f.error]
    by_mode: dict[str, list[str]] = defaultdict(list)
    for f in ok:
        if f.mode != "RGB":
            by_mode[f.mode or "?"].append(str(f.path))
    for mode, paths in sorted(by_mode.items()):
        out.append(Finding("info", "mode", f"mode {mode} is converted to RGB", paths))
    rotated = [str(f.path) for f in ok if f.exif_rotated]
    if rotated:
        out.append(Finding("info", "exif-rotated", "EXIF orientation is applied", rotated))
    tiny = [str(f.path) for f in ok if min(f.width, f.height) < image_size]
    if tiny:
        out.append(Finding("warning", "tiny", f"smaller than the {image_size}px crop: upscaled, so blurry", tiny))
    placeholders = [str(f.path) for f in ok if PLACEHOLDER_NAME.search(f.path.stem)
                    or (f.colours is not None and f.colours < 64)]
    if placeholders:
        out.append(Finding("warning", "placeholder", "likely placeholders, not photos of their class (a 'not "
                           "found' name or a flat graphic with few colours)", placeholders))
    return out


def duplicate_findings(files: list[FileInfo], near_bits: int) -> list[Finding]:
    """Byte-identical and near-identical groups. Linear in the files: Python objects are made for
    the files in a group only (one per file for 100,000 files made the garbage collector's passes,
    and so the search, grow faster than the files)."""
    out = []
    ok = [f for f in files if not f.error]
    copies = Counter(f.sha256 for f in ok)
    exact: dict[str, list[FileInfo]] = defaultdict(list)
    for f in ok:
        if copies[f.sha256] > 1:
            exact[f.sha256].append(f)
    exact_pairs = set()
    for group in exact.values():
        out.append(_dup_finding(group, "byte-identical"))
        exact_pairs |= {(a.path, b.path) for a in group for b in group}
    hashed = [f for f in ok if f.dhash is not None]
    if len(hashed) > 1:
        pairs, _ = near_pairs(np.fromiter((f.dhash for f in hashed), dtype=np.uint64, count=len(hashed)), near_bits)
        parent: dict[int, int] = {}  # union-find over the files in a near pair only

        def find(i: int) -> int:
            parent.setdefault(i, i)
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i, j in pairs:
            parent[find(i)] = find(j)
        groups: dict[int, list[FileInfo]] = defaultdict(list)
        for i in sorted(parent):
            groups[find(i)].append(hashed[i])
        for group in groups.values():
            if len(group) > 1 and not all((a.path, b.path) in exact_pairs for a in group for b in group):
                out.append(_dup_finding(group, "near-identical"))
                if len(group) >= 4:
                    out.append(Finding("warning", "placeholder", f"{len(group)} near-identical images: likely a "
                                       "placeholder or a stock image", [str(f.path) for f in group]))
    return out


def near_pairs(hashes: np.ndarray, near_bits: int) -> tuple[list[tuple[int, int]], int]:
    """The pairs (i, j) of `hashes` (uint64, 64-bit dHashes) that differ in at most `near_bits` bits,
    and how many pairs were compared to find them. Near-linear in the number of hashes, not quadratic:

    - equal hashes are one: their images pair up without a comparison, and they are searched once;
    - the 64 bits are cut into 2r blocks (r = near_bits); two hashes at most r bits apart agree
      exactly on at least r of the blocks, so every such pair shares one of the C(2r, r) keys made of
      r blocks (32 bits each). Hashes are grouped by each key (one sort of key and index in one integer), and
      only hashes sharing a key are compared. Two unrelated hashes share a 32-bit key by chance with
      probability about C(2r, r) / 2^32 (1.6e-8 for r = 4: a few pairs among 100,000 hashes), so the
      comparisons are about the near pairs themselves. Cost: C(2r, r) sorts of the distinct hashes
      (70 for r = 4), each O(n log n) in numpy; no Python loop over hashes or keys."""
    if not 0 <= near_bits <= 5:
        raise ValueError(f"near_bits must be from 0 to 5 (the keys number C(2r, r)), got {near_bits}")
    unique, first, inverse = np.unique(np.asarray(hashes, dtype=np.uint64), return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    copies = np.flatnonzero(first[inverse] != np.arange(len(inverse)))  # the same hash: the same image to the hash
    pairs = list(zip(first[inverse[copies]].tolist(), copies.tolist()))
    if near_bits == 0 or len(unique) < 2:
        return pairs, 0
    blocks = 2 * near_bits
    edges = [round(64 * k / blocks) for k in range(blocks + 1)]
    index = np.arange(len(unique), dtype=np.uint64)
    shift = np.uint64(max(1, (len(unique) - 1).bit_length()))  # the index's bits, below the key's (<= 34 bits)
    found = []  # arrays of u * len(unique) + v, u < v: the indices into `unique` of hashes sharing a key
    for combo in itertools.combinations(range(blocks), near_bits):
        key = np.zeros(len(unique), dtype=np.uint64)  # the combo's blocks side by side: 32-34 bits (r = 4: 32)
        width = 0
        for b in combo:
            lo, hi = edges[b], edges[b + 1]
            key |= ((unique >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)) << np.uint64(width)
            width += hi - lo
        ordered = np.sort((key << shift) | index)  # by key, then by index
        keys, members = ordered >> shift, (ordered & ((np.uint64(1) << shift) - np.uint64(1))).astype(np.int64)
        for gap in range(1, len(ordered)):  # hashes `gap` apart in the order with the same key: a run's pairs
            same = np.flatnonzero(keys[gap:] == keys[:-gap])
            if not len(same):
                break
            found.append(members[same] * len(unique) + members[same + gap])
    if not found:
        return pairs, 0
    cand = np.unique(np.concatenate(found))
    u, v = cand // len(unique), cand % len(unique)
    x = np.bitwise_xor(unique[u], unique[v])
    bits = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(1)
    near = bits <= near_bits
    pairs += zip(first[u[near]].tolist(), first[v[near]].tolist())
    return pairs, len(cand)


def _dup_finding(group: list[FileInfo], what: str) -> Finding:
    paths = [str(f.path) for f in group]
    splits = {f.split for f in group}
    if len(splits) > 1:
        return Finding("error", "leakage", f"{what} images in {' and '.join(sorted(splits))}: the validation "
                       "score is inflated; remove the copies from one split", paths)
    classes = {f.cls for f in group}
    extra = f" with different labels ({', '.join(sorted(classes))})" if len(classes) > 1 else ""
    return Finding("warning", "duplicate", f"{what} images within {group[0].split}{extra}", paths)


def unreadable_files(paths: Iterable[str | Path], *, full: bool = False) -> dict[str, str]:
    """{path: reason} for the files that cannot be read: run by `train`. By default only the header
    is read (the check's fast part: empty files, not an image whatever the extension, over the
    decompression-bomb guard); `full` decodes every file (a truncated JPEG too)."""
    out = {}
    for p in paths:
        info = inspect_file(FileInfo(Path(p), "", ""), full=full)
        if info.error:
            out[str(p)] = info.error
    return out
