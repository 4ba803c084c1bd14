"""TensorFlow.js layers models (`model.json` + binary shards), read without TensorFlow.

`model.json` -> `weightsManifest`: a list of groups, each with `paths` (shard files, in order) and
`weights` (entries `{name, shape, dtype}`). A group's shards concatenated in `paths` order hold its
weights back to back, in manifest order, little-endian.
"""

from __future__ import annotations

import json
import math
from pathlib import Path, PurePosixPath

import numpy as np

_DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4")}
MAX_MODEL_JSON_BYTES = 64 << 20


def read_tfjs_weights(model_json: str | Path) -> dict[str, np.ndarray]:
    """Every weight of a TF.js layers model, by name, as numpy arrays in Keras layout.

    Raises FileNotFoundError for a missing file and ValueError for anything malformed: a bad
    manifest, an unsupported dtype or quantisation, a shard path outside the model's folder, or
    shards whose size does not match the manifest.
    """
    model_json = Path(model_json)
    if not model_json.is_file():
        raise FileNotFoundError(f"TF.js model file not found: {model_json}")
    if model_json.stat().st_size > MAX_MODEL_JSON_BYTES:
        raise ValueError(f"{model_json} is larger than {MAX_MODEL_JSON_BYTES} bytes: not a model.json")
    try:
        meta = json.loads(model_json.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{model_json} is not valid JSON: {e}") from e
    groups = meta.get("weightsManifest") if isinstance(meta, dict) else None
    if not isinstance(groups, list) or not groups:
        raise ValueError(f"{model_json} has no 'weightsManifest' list: not a TF.js layers model")

    out: dict[str, np.ndarray] = {}
    for g, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("paths"), list) \
                or not isinstance(group.get("weights"), list):
            raise ValueError(f"{model_json}: weightsManifest[{g}] needs 'paths' and 'weights' lists")
        data = b"".join(_read_shard(model_json.parent, p) for p in group["paths"])
        offset = 0
        for entry in group["weights"]:
            name, shape, dtype = _check_entry(model_json, entry)
            if name in out:
                raise ValueError(f"{model_json}: weight {name!r} appears twice in the manifest")
            n = math.prod(shape) * dtype.itemsize
            if offset + n > len(data):
                raise ValueError(
                    f"{model_json}: shards of group {g} hold {len(data)} bytes, too few for weight "
                    f"{name!r} at offset {offset} ({n} bytes); a shard is missing or truncated"
                )
            out[name] = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)
            offset += n
        if offset != len(data):
            raise ValueError(f"{model_json}: shards of group {g} hold {len(data)} bytes, manifest needs {offset}")
    return out


def _read_shard(folder: Path, rel: object) -> bytes:
    if not isinstance(rel, str) or not rel or PurePosixPath(rel).is_absolute() or ".." in PurePosixPath(rel).parts:
        raise ValueError(f"shard path {rel!r} in {folder / 'model.json'} must be a relative path inside {folder}")
    path = folder / rel
    if not path.is_file():
        raise FileNotFoundError(f"TF.js weight shard not found: {path}")
    return path.read_bytes()


def _check_entry(model_json: Path, entry: object) -> tuple[str, list[int], np.dtype]:
    if not isinstance(entry, dict):
        raise ValueError(f"{model_json}: manifest entry {entry!r} is not an object")
    name, shape, dtype = entry.get("name"), entry.get("shape"), entry.get("dtype", "float32")
    if not isinstance(name, str):
        raise ValueError(f"{model_json}: manifest entry without a string 'name': {entry!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d < 2**31 for d in shape):
        raise ValueError(f"{model_json}: weight {name!r} has a bad shape {shape!r}")
    if "quantization" in entry:
        raise ValueError(f"{model_json}: weight {name!r} is quantised; only float32/int32 weights are supported")
    if dtype not in _DTYPES:
        raise ValueError(f"{model_json}: weight {name!r} has dtype {dtype!r}; supported: {sorted(_DTYPES)}")
    return name, shape, _DTYPES[dtype]
