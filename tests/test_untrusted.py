"""Untrusted input: malformed or hostile files give a clear error of the right type, never a crash
or a hang. Fuzzed with hypothesis (bounded: a few hundred cases per reader)."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save as st_save

from headstart.data import ImageDataset, Sample, load_image
from headstart.data.transforms import Preprocessing
from headstart.io.checkpoint import read_checkpoint, save_checkpoint
from headstart.io.formats.safetensors import read_safetensors
from headstart.io.formats.tfjs import read_tfjs_weights
from headstart.io.runstate import read_run_state
from headstart.models import create_model, open_model

FUZZ = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


SEEDS = {fmt: _image_bytes(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")}


def flip_bytes(draw, data: bytes, most: int) -> bytearray:
    """`data` with up to `most` bytes set to drawn values."""
    out = bytearray(data)
    for _ in range(draw(st.integers(0, most))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    return out


@st.composite
def mangled_images(draw) -> bytes:
    """A valid image of some format with bytes flipped, cut, or spliced; or plain noise."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=400))
    data = flip_bytes(draw, SEEDS[draw(st.sampled_from(sorted(SEEDS)))], 8)
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(data=mangled_images())
def test_fuzz_image_loader_never_raises(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("img") / "x.jpg"
    path.write_bytes(data)
    ds = ImageDataset([Sample(path, 0)], Preprocessing(image_size=16).train_transform())
    image, label, index, reason = ds[0]
    assert (image is None) == bool(reason)
    if image is not None:
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_decompression_bomb_and_absurd_dimensions_are_refused(tmp_path: Path) -> None:
    for w, h in ((100_000, 100_000), (20_000, 6_000)):  # 10 G and 120 M pixels
        path = tmp_path / f"bomb{w}.png"
        path.write_bytes(_png_header(w, h))
        ds = ImageDataset([Sample(path, 0)], Preprocessing(image_size=16).eval_transform())
        image, _, _, reason = ds[0]
        assert image is None and "DecompressionBomb" in reason
        with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
            load_image(path)


@st.composite
def mangled_safetensors(draw) -> bytes:
    good = st_save({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, metadata={"headstart": "{}"})
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:  # a header of any length claim followed by anything
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + draw(st.binary(max_size=100))
    if choice == 2:  # a well-formed length with a fuzzed JSON header
        header = json.dumps(draw(st.dictionaries(st.text(max_size=5), st.one_of(
            st.integers(), st.text(max_size=8), st.lists(st.integers(-5, 2**40), max_size=4),
            st.fixed_dictionaries({"dtype": st.sampled_from(["F32", "I64", "BOOL", "XX"]),
                                   "shape": st.lists(st.integers(-2, 2**33), max_size=3),
                                   "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3)})), max_size=3)))
        body = header.encode()
        return struct.pack("<Q", len(body)) + body + draw(st.binary(max_size=64))
    return bytes(flip_bytes(draw, good, 6))


@FUZZ
@given(data=mangled_safetensors())
def test_fuzz_safetensors_reader(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("st") / "w.safetensors"
    path.write_bytes(data)
    try:
        read_safetensors(path)
    except ValueError:
        pass
    for loader in (read_checkpoint, read_run_state):
        with pytest.raises(ValueError):
            loader(path)


def _good_ckpt() -> bytes:
    from headstart.io.formats.mindspore import encode_ckpt, torch_resnet_to_mindspore

    sd = {k: v[:2].clone() if v.ndim else v for k, v in create_model("resnet18", num_classes=2).state_dict().items()
          if k.startswith(("conv1", "bn1", "fc", "layer1.0."))}  # a few real names, small tensors
    return encode_ckpt({**torch_resnet_to_mindspore(sd), "global_step": np.int32(3)})


@st.composite
def mangled_ckpts(draw) -> bytes:
    """A MindSpore checkpoint with bytes flipped, cut or spliced; or a hand-built message with any
    varints, dims, types and lengths."""
    good = _CKPT
    kind = draw(st.sampled_from(["flip", "cut", "fields"]))
    if kind == "cut":
        return good[:draw(st.integers(0, len(good)))]
    if kind == "fields":
        from headstart.io.formats.mindspore import _encode_varint, _key, _length_delimited

        dims = draw(st.lists(st.integers(-3, 2**62), max_size=20))
        tensor = b"".join(_key(1, 0) + _encode_varint(d) for d in dims)
        tensor += _length_delimited(2, draw(st.sampled_from([b"Float32", b"Int64", b"Bool", b"Nope", b"\xff"])))
        tensor += _length_delimited(3, draw(st.binary(max_size=64)))
        tag = draw(st.sampled_from([b"conv1.weight", b"fc.bias", b"moments.x", b"\xfe\xff", b""]))
        return _length_delimited(1, _length_delimited(1, tag) + _length_delimited(2, tensor)) + draw(st.binary(max_size=8))
    return bytes(flip_bytes(draw, good, 8))


_CKPT = _good_ckpt()


@FUZZ
@given(data=mangled_ckpts())
@example(data=b"\n%\n\x0cconv1.weight\x12\x15\x08\x00\x08\x80\x80\x80\x80\x80\x80\x80\x80\x10\x12\x05Int64\x1a\x00")
def test_fuzz_mindspore_ckpt_reader(tmp_path_factory, data: bytes) -> None:
    """Only ValueError (with the file's name) comes out of the .ckpt reader and the weights loader."""
    from headstart.io.formats.mindspore import read_ckpt
    from headstart.io.weights import load_weights_file

    path = tmp_path_factory.mktemp("ms") / "w.ckpt"
    path.write_bytes(data)
    try:
        tensors = read_ckpt(path)
        assert all(isinstance(v, np.ndarray) for v in tensors.values())
    except ValueError as e:
        assert "w.ckpt" in str(e)
    try:
        load_weights_file(path)
    except ValueError:
        pass


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True)
                       | st.text(max_size=10), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                       max_leaves=12)


@pytest.fixture(scope="module")
def good_meta(tmp_path_factory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("ck") / "ck"
    save_checkpoint(path, create_model("tiny", num_classes=2), classes=["a", "b"], preprocessing=Preprocessing(image_size=32))
    from headstart.io.formats.safetensors import read_safetensors as read

    tensors, raw = read(path.with_suffix(".safetensors"))
    return tensors, json.loads(raw["headstart"])


@FUZZ
@given(key=st.sampled_from(["classes", "arch", "arch_kwargs", "preprocessing", "format", "format_version"]),
       value=JSONISH)
def test_fuzz_checkpoint_metadata(tmp_path_factory, good_meta, key: str, value) -> None:
    tensors, meta = good_meta
    path = tmp_path_factory.mktemp("ck") / "ck.safetensors"
    path.write_bytes(st_save(tensors, metadata={"headstart": json.dumps({**meta, key: value})}))
    try:  # (arch given: a file that is no checkpoint is then read as tiny's weights, not built as a resnet50)
        ck = open_model(path, arch="tiny")
    except ValueError:
        return
    assert ck.classes and isinstance(ck.preprocessing, Preprocessing)


@FUZZ
@given(doc=JSONISH, shard=st.binary(max_size=64))
def test_fuzz_tfjs_model_json(tmp_path_factory, doc, shard: bytes) -> None:
    folder = tmp_path_factory.mktemp("tfjs")
    (folder / "group1-shard1of1.bin").write_bytes(shard)
    if isinstance(doc, dict) and doc:
        doc = {"weightsManifest": [{"paths": ["group1-shard1of1.bin"], "weights": list(doc.values())}]}
    (folder / "model.json").write_text(json.dumps(doc))
    try:
        read_tfjs_weights(folder / "model.json")
    except (ValueError, FileNotFoundError):
        pass


@FUZZ
@given(entries=st.lists(st.fixed_dictionaries({
    "name": st.text(max_size=6), "shape": st.lists(st.integers(-3, 2**31 + 5), max_size=4),
    "dtype": st.sampled_from(["float32", "int32", "float16", "uint8"])}), max_size=4),
    shard=st.binary(max_size=64), path=st.sampled_from(["group1-shard1of1.bin", "../x.bin", "/etc/passwd", "missing"]))
def test_fuzz_tfjs_manifest(tmp_path_factory, entries, shard: bytes, path: str) -> None:
    folder = tmp_path_factory.mktemp("tfjs")
    (folder / "group1-shard1of1.bin").write_bytes(shard)
    (folder / "model.json").write_text(json.dumps({"weightsManifest": [{"paths": [path], "weights": entries}]}))
    try:
        out = read_tfjs_weights(folder / "model.json")
    except (ValueError, FileNotFoundError):
        return
    assert sum(a.nbytes for a in out.values()) == len(shard)


def test_pickle_is_never_needed_and_pickled_checkpoints_are_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pwned')",))

    torch.save({"fc.weight": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="not a loadable PyTorch weights file"):
        create_model("tiny", weights=tmp_path / "evil.pth")
