"""MindSpore `.ckpt` files, read and written without MindSpore, and the tutorial's ResNet names.

The file is one protobuf message (proto2), decoded here by hand:

    Checkpoint  { repeated Value value = 1; }
    Value       { string tag = 1; TensorProto tensor = 2; }
    TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }

`tag` is the parameter name, `tensor_type` a MindSpore dtype name ("Float32", ...), and
`tensor_content` the raw little-endian values. MindSpore writes a very large tensor as several
Values with the same tag and full dims, the content split in order; they are joined here. Fields
this reader does not know are skipped by their wire type, as protobuf does.

Names: the MindSpore ResNet50 tutorial's network calls the stem BatchNorm `norm`, the block
BatchNorms `norm1..3`, the projection `down_sample`, and BatchNorm tensors `gamma`, `beta`,
`moving_mean`, `moving_variance`. Its convs use pad_mode='same' (see models/layers.py) and have
no bias; its BatchNorm epsilon is 1e-5, as torch's. Optimizer state saved beside the weights
(`moments.*`, `learning_rate`, `global_step`, ...) is not part of the model and is skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch

# MindSpore dtype name -> numpy dtype (little-endian)
DTYPES: dict[str, np.dtype] = {
    "Float32": np.dtype("<f4"), "Float16": np.dtype("<f2"), "Float64": np.dtype("<f8"),
    "Int8": np.dtype("i1"), "Int16": np.dtype("<i2"), "Int32": np.dtype("<i4"), "Int64": np.dtype("<i8"),
    "UInt8": np.dtype("u1"), "UInt16": np.dtype("<u2"), "UInt32": np.dtype("<u4"), "UInt64": np.dtype("<u8"),
    "Bool": np.dtype("?"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
MAX_DIMS = 16


class CheckpointFormatError(ValueError):
    """The bytes are not a MindSpore checkpoint."""


# ---------------------------------------------------------------------------------------------
# protobuf wire format, the four wire types a proto2 message can use here.

def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointFormatError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise CheckpointFormatError("varint longer than 10 bytes")


def _fields(buf: bytes):
    """(field number, wire type, value) of each field of a message: ints for varints and fixed
    widths, bytes for length-delimited fields."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise CheckpointFormatError(f"field {number} claims {size} bytes; {len(buf) - pos} are left")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > len(buf):
                raise CheckpointFormatError("truncated fixed-width field")
            value, pos = int.from_bytes(buf[pos:pos + width], "little"), pos + width
        else:
            raise CheckpointFormatError(f"wire type {wire} (field {number}) is not valid protobuf here")
        if number == 0:
            raise CheckpointFormatError("field number 0")
        yield number, wire, value


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 dims are written as 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


# ---------------------------------------------------------------------------------------------
# Reading and writing.

def _tensor(buf: bytes) -> tuple[list[int], str, bytes]:
    dims: list[int] = []
    dtype, content = "", b""
    for number, wire, value in _fields(buf):
        if number == 1 and wire == 0:
            dims.append(value - (1 << 64) if value >= 1 << 63 else value)
        elif number == 1 and wire == 2:  # packed dims
            pos = 0
            while pos < len(value):
                d, pos = _varint(value, pos)
                dims.append(d)
        elif number == 2 and wire == 2:
            dtype = value.decode("utf-8", "replace")
        elif number == 3 and wire == 2:
            content = value
    return dims, dtype, content


def parse_ckpt(data: bytes) -> dict[str, np.ndarray]:
    """The tensors of a MindSpore checkpoint's bytes, by name, in file order."""
    parts: dict[str, tuple[list[int], str, list[bytes]]] = {}
    for number, wire, value in _fields(data):
        if number != 1 or wire != 2:
            continue
        tag, tensor = None, None
        for n, w, v in _fields(value):
            if n == 1 and w == 2:
                tag = v.decode("utf-8", "replace")
            elif n == 2 and w == 2:
                tensor = _tensor(v)
        if tag is None or tensor is None:
            continue  # e.g. a map-tensor entry: not a plain named tensor
        dims, dtype, content = tensor
        if tag in parts:
            if parts[tag][:2] != (dims, dtype):
                raise CheckpointFormatError(f"tensor {tag!r} appears twice with different shapes or types")
            parts[tag][2].append(content)
        else:
            parts[tag] = (dims, dtype, [content])
    if not parts:
        raise CheckpointFormatError("no named tensors found")
    out: dict[str, np.ndarray] = {}
    for tag, (dims, dtype, chunks) in parts.items():
        if dtype not in DTYPES:
            raise CheckpointFormatError(f"tensor {tag!r} has type {dtype!r}; known: {', '.join(DTYPES)}")
        # (a zero dim makes the count 0 whatever the others are: those must still make an array numpy can hold)
        too_big = np.prod([d for d in dims if d], dtype=np.float64) * DTYPES[dtype].itemsize >= np.iinfo(np.intp).max
        if len(dims) > MAX_DIMS or any(d < 0 for d in dims) or too_big:
            raise CheckpointFormatError(f"tensor {tag!r} has invalid dims {dims[:MAX_DIMS]}")
        raw = b"".join(chunks)
        count = int(np.prod(dims, dtype=np.float64)) if dims else 1
        if count * DTYPES[dtype].itemsize != len(raw):
            raise CheckpointFormatError(f"tensor {tag!r}: dims {dims} of {dtype} need "
                                        f"{count * DTYPES[dtype].itemsize} bytes, the file has {len(raw)}")
        out[tag] = np.frombuffer(raw, DTYPES[dtype]).reshape(dims).copy()
    return out


def read_ckpt(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The tensors of a MindSpore `.ckpt` file, by name; ValueError if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"MindSpore checkpoint not found: {path}")
    try:
        return parse_ckpt(path.read_bytes())
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{path} is not a MindSpore checkpoint ({e})") from None


def encode_ckpt(tensors: dict[str, np.ndarray | torch.Tensor]) -> bytes:
    """The bytes of a MindSpore checkpoint holding `tensors` (written as MindSpore 2.x does:
    one Value per tensor, dims as separate varints)."""
    out = bytearray()
    for name, t in tensors.items():
        a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        if dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} has no MindSpore equivalent; "
                            f"cast it to one of {', '.join(str(d) for d in _NAMES)}")
        tensor = b"".join(_key(1, 0) + _encode_varint(int(d)) for d in a.shape)
        tensor += _length_delimited(2, _NAMES[dtype].encode())
        tensor += _length_delimited(3, np.ascontiguousarray(a, dtype=dtype).tobytes())
        out += _length_delimited(1, _length_delimited(1, name.encode()) + _length_delimited(2, tensor))
    return bytes(out)


# ---------------------------------------------------------------------------------------------
# The tutorial's ResNet names <-> headstart's (torchvision's).

_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_BN_BACK = {v: k for k, v in _BN.items()}
_OPTIMIZER = re.compile(r"^(moments|accum|momentum|learning_rate|global_step|beta1_power|beta2_power|"
                        r"moment1|moment2|adam_m|adam_v|current_iterator_step|epoch_num|step_num|"
                        r"loss_scale|scale_sense)(\.|$)")


_BN_FIELD = "(gamma|beta|moving_mean|moving_variance)"
_RULES = [  # (tutorial name pattern, headstart name from the match)
    (r"conv1\.weight|fc\.weight|fc\.bias|layer\d+\.\d+\.conv\d\.weight", lambda m: m[0]),
    (rf"norm\.{_BN_FIELD}", lambda m: f"bn1.{_BN[m[1]]}"),
    (rf"(layer\d+\.\d+)\.norm(\d)\.{_BN_FIELD}", lambda m: f"{m[1]}.bn{m[2]}.{_BN[m[3]]}"),
    (r"(layer\d+\.\d+)\.down_sample\.0\.weight", lambda m: f"{m[1]}.downsample.0.weight"),
    (rf"(layer\d+\.\d+)\.down_sample\.1\.{_BN_FIELD}", lambda m: f"{m[1]}.downsample.1.{_BN[m[2]]}"),
]


def _torch_name(name: str) -> str | None:
    """A tutorial-ResNet parameter name -> headstart's, or None if it is not one."""
    for pattern, target in _RULES:
        m = re.fullmatch(pattern, name)
        if m:
            return target(m)
    return None


def mindspore_resnet_to_torch(tensors: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tutorial ResNet's tensors -> (headstart ResNet state dict, names skipped).

    Optimizer state is skipped; any other unknown name is an error, since a model missing a
    tensor would silently keep random weights. BatchNorm's `num_batches_tracked` is added (0)."""
    sd: dict[str, torch.Tensor] = {}
    skipped, unknown = [], []
    for name, a in tensors.items():
        target = _torch_name(name)
        if target is None:
            (skipped if _OPTIMIZER.match(name) else unknown).append(name)
            continue
        sd[target] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if unknown:
        shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
        raise ValueError(f"not the MindSpore ResNet tutorial's parameter names: {shown}. Known: conv1.weight, "
                         "norm.*, layerN.M.convK.weight, layerN.M.normK.*, layerN.M.down_sample.{0,1}.*, fc.*")
    if "conv1.weight" not in sd or "fc.weight" not in sd:
        raise ValueError("not a ResNet checkpoint: conv1.weight or fc.weight is missing")
    for name in [k for k in sd if k.endswith(".running_mean")]:
        sd[name.replace("running_mean", "num_batches_tracked")] = torch.tensor(0, dtype=torch.long)
    return sd, skipped


def torch_resnet_to_mindspore(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A headstart/torchvision ResNet state dict -> the tutorial ResNet's names, float32."""
    out: dict[str, np.ndarray] = {}
    for name, t in state_dict.items():
        if name.endswith("num_batches_tracked"):
            continue
        m = re.fullmatch(r"(?:(layer\d+\.\d+)\.)?(bn\d|downsample\.1)\.(weight|bias|running_mean|running_var)", name)
        if m:
            block, bn, field = m.groups()
            ms_bn = "down_sample.1" if bn == "downsample.1" else ("norm" if block is None else f"norm{bn[2:]}")
            target = f"{block + '.' if block else ''}{ms_bn}.{_BN_BACK[field]}"
        elif re.fullmatch(r"layer\d+\.\d+\.downsample\.0\.weight", name):
            target = name.replace("downsample", "down_sample")
        elif re.fullmatch(r"conv1\.weight|fc\.weight|fc\.bias|layer\d+\.\d+\.conv\d\.weight", name):
            target = name
        else:
            target = None
        if target is None or _torch_name(target) != name:
            raise ValueError(f"{name!r} is not a ResNet parameter; only ResNets convert to MindSpore's tutorial layout")
        out[target] = t.detach().float().cpu().numpy()
    return out
