"""MindSpore checkpoints without MindSpore: the .ckpt codec, the tutorial ResNet's names, TF-style
'same' padding, `--weights x.ckpt`, `headstart convert`; and, where MindSpore is installed (CI puts
it in .venv-mindspore), the round trip against real MindSpore in both directions."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.cli import main
from headstart.export.convert import convert
from headstart.io.formats.mindspore import (CheckpointFormatError, encode_ckpt, mindspore_resnet_to_torch, parse_ckpt,
                                            read_ckpt, torch_resnet_to_mindspore)
from headstart.io.weights import load_weights_file
from headstart.models import create_model, open_model
from headstart.models.layers import same_padding
from headstart.runtime.device import resolve_runtime

ROOT = Path(__file__).resolve().parents[1]


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random BatchNorm statistics, so that a wrong name mapping cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.05)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.05)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
    return model.eval()


def mindspore_ckpt(path: Path, model: torch.nn.Module, *, optimizer_state: bool = True) -> Path:
    """`model` written in the tutorial's layout, plus what a training callback adds beside it."""
    tensors: dict = dict(torch_resnet_to_mindspore(model.state_dict()))
    if optimizer_state:
        tensors |= {"moments.fc.weight": np.zeros((2, 512), np.float32), "learning_rate": np.float32(0.001),
                    "global_step": np.int32(7)}
    path.write_bytes(encode_ckpt(tensors))
    return path


# ---------------------------------------------------------------------------------------------
# The codec.

def test_codec_round_trips_dtypes_shapes_and_scalars() -> None:
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
               "b.half": rng.normal(size=(5,)).astype(np.float16),
               "c.int": np.arange(6, dtype=np.int64).reshape(2, 3),
               "global_step": np.array(7, dtype=np.int32), "flag": np.array([True, False])}
    back = parse_ckpt(encode_ckpt(tensors))
    assert list(back) == list(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v)


def value(tag: str, dims: list[int], dtype: str, content: bytes, *, packed: bool = False) -> bytes:
    """One `Value` field of a Checkpoint message, written field by field."""
    from headstart.io.formats.mindspore import _encode_varint, _key, _length_delimited

    if packed:
        tensor = _length_delimited(1, b"".join(_encode_varint(d) for d in dims))
    else:
        tensor = b"".join(_key(1, 0) + _encode_varint(d) for d in dims)
    tensor += _length_delimited(2, dtype.encode()) + _length_delimited(3, content)
    return _length_delimited(1, _length_delimited(1, tag.encode()) + _length_delimited(2, tensor))


def test_codec_joins_sliced_tensors_reads_packed_dims_and_skips_unknown_fields() -> None:
    whole = np.arange(12, dtype=np.float32).reshape(3, 4)
    raw = whole.tobytes()
    # MindSpore splits a huge tensor into Values with the same tag and the full dims
    sliced = value("w", [3, 4], "Float32", raw[:20]) + value("w", [3, 4], "Float32", raw[20:])
    np.testing.assert_array_equal(parse_ckpt(sliced)["w"], whole)
    np.testing.assert_array_equal(parse_ckpt(value("w", [3, 4], "Float32", raw, packed=True))["w"], whole)
    # a field this reader does not know (number 9, a varint) is skipped, as protobuf does
    np.testing.assert_array_equal(parse_ckpt(b"\x48\x96\x01" + encode_ckpt({"w": whole}))["w"], whole)
    assert encode_ckpt({"w": whole}) == value("w", [3, 4], "Float32", raw)  # MindSpore's own layout
    with pytest.raises(ValueError, match="appears twice with different shapes"):
        parse_ckpt(value("w", [3, 4], "Float32", raw) + value("w", [12], "Float32", raw))
    with pytest.raises(ValueError, match="type 'Complex64'"):
        parse_ckpt(value("w", [1], "Complex64", raw[:8]))


@pytest.mark.parametrize("data,match", [
    (b"", "no named tensors"),
    (b"\x0a\x05abc", "claims 5 bytes"),
    (b"\x0f", "wire type 7"),
    (encode_ckpt({"w": np.zeros(4, np.float32)})[:-3], "claims"),
])
def test_codec_rejects_malformed_bytes(data: bytes, match: str) -> None:
    with pytest.raises(CheckpointFormatError, match=match):
        parse_ckpt(data)


def test_codec_rejects_content_that_does_not_fill_the_dims() -> None:
    data = encode_ckpt({"w": np.zeros(4, np.float32)}).replace(b"\x08\x04", b"\x08\x05")
    with pytest.raises(ValueError, match="need 20 bytes, the file has 16"):
        parse_ckpt(data)


def test_read_ckpt_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.ckpt"):
        read_ckpt(tmp_path / "nothere.ckpt")
    (tmp_path / "text.ckpt").write_text("hello, not protobuf")
    with pytest.raises(ValueError, match="text.ckpt is not a MindSpore checkpoint"):
        read_ckpt(tmp_path / "text.ckpt")


# ---------------------------------------------------------------------------------------------
# Names and padding.

def test_tutorial_names_map_both_ways() -> None:
    sd = create_model("resnet50", num_classes=2).state_dict()
    ms = torch_resnet_to_mindspore(sd)
    assert len(ms) == 267  # the tutorial's ResNet50 with a 2-class head has 267 named tensors
    for name in ("conv1.weight", "norm.gamma", "norm.moving_variance", "layer1.0.conv3.weight", "layer4.2.norm3.beta",
                 "layer1.0.down_sample.0.weight", "layer3.0.down_sample.1.moving_mean", "fc.weight", "fc.bias"):
        assert name in ms, name
    back, skipped = mindspore_resnet_to_torch(ms)
    assert skipped == [] and set(back) == set(sd)
    for k in ms:
        assert k.startswith(("conv", "norm", "layer", "fc"))
    for k, v in sd.items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(back[k], v), k


def test_unknown_names_are_an_error_and_optimizer_state_is_skipped() -> None:
    ms = torch_resnet_to_mindspore(create_model("resnet18", num_classes=2).state_dict())
    _, skipped = mindspore_resnet_to_torch({**ms, "moments.conv1.weight": ms["conv1.weight"],
                                            "learning_rate": np.float32(0.1), "global_step": np.int32(3)})
    assert skipped == ["moments.conv1.weight", "learning_rate", "global_step"]
    with pytest.raises(ValueError, match="end_point.weight"):
        mindspore_resnet_to_torch({**ms, "end_point.weight": ms["fc.weight"]})


@pytest.mark.parametrize("n,k,s,expected", [(224, 7, 2, (2, 3)), (112, 3, 2, (0, 1)), (56, 3, 2, (0, 1)),
                                            (56, 3, 1, (1, 1)), (56, 1, 2, (0, 0)), (7, 3, 2, (1, 1)),
                                            (225, 7, 2, (3, 3))])
def test_same_padding_is_tensorflows(n: int, k: int, s: int, expected: tuple[int, int]) -> None:
    assert same_padding(n, k, s) == expected
    out = (n + sum(expected) - k) // s + 1
    assert out == -(-n // s)  # the defining property: ceil(n / s) outputs


def test_same_padding_resnet_differs_only_where_it_should() -> None:
    torch.manual_seed(0)
    a = randomize_bn(create_model("resnet50", num_classes=2))
    b = randomize_bn(create_model("resnet50", num_classes=2, padding="same"))
    b.load_state_dict(a.state_dict())
    assert b.arch_kwargs == {"padding": "same"}
    assert b.conv1.padding == (0, 0) and b.layer2[0].conv2.padding == (0, 0) and b.layer2[1].conv2.padding == (1, 1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert not torch.allclose(a(x), b(x), atol=1e-3)  # the strided layers see shifted windows
        # an odd size where both rules pad alike: 7x7/2 on 225 pads 3 and 3, like torch's padding=3
        from headstart.models.layers import pad_same

        x225 = torch.randn(1, 3, 225, 225)
        torch.testing.assert_close(b.conv1(pad_same(x225, 7, 2)), a.conv1(x225))
    with pytest.raises(ValueError, match="padding='valid' is not one of"):
        create_model("resnet50", padding="valid")


@pytest.mark.parametrize("arch,kwargs", [("resnet50", {"padding": "same"}), ("efficientnet_lite0", {})])
def test_models_with_same_padding_still_fold_conv_and_batchnorm(arch: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = randomize_bn(create_model(arch, num_classes=3, **kwargs))
    fast = resolve_runtime(precision="fp32", engine="torch").inference_model(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # all folded
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(fast(x.contiguous(memory_format=torch.channels_last)), model(x),
                                   atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Using .ckpt files: --weights, evaluate, predict, convert.

def test_ckpt_weights_select_same_padding_and_keep_the_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = randomize_bn(create_model("resnet18", num_classes=2, padding="same"))
    path = mindspore_ckpt(tmp_path / "best.ckpt", src)
    loaded = load_weights_file(path)
    assert loaded.model_kwargs == {"padding": "same"}
    assert loaded.skipped == ["moments.fc.weight", "learning_rate", "global_step"]
    model = create_model("resnet18", num_classes=2, weights=path).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), atol=0, rtol=0)
    fresh = create_model("resnet18", num_classes=5, weights=path)  # another class count: a new head
    assert fresh.fc.out_features == 5 and torch.equal(fresh.conv1.weight, src.conv1.weight)


@pytest.mark.slow
def test_train_evaluate_and_predict_take_a_ckpt(tmp_path: Path, dataset: Path, capsys) -> None:
    torch.manual_seed(0)
    ckpt = mindspore_ckpt(tmp_path / "net.ckpt", randomize_bn(create_model("resnet18", num_classes=2, padding="same")))
    common = ["--workers", "0", "--precision", "fp32"]
    assert main(["train", str(dataset), "--arch", "resnet18", "--weights", str(ckpt), "--epochs", "1",
                 "--image-size", "32", "--out", str(tmp_path / "run"), *common]) == 0
    trained = open_model(tmp_path / "run" / "best")
    assert trained.meta["arch_kwargs"] == {"padding": "same"}  # prediction rebuilds the same padding
    assert main(["evaluate", "--weights", str(ckpt), "--arch", "resnet18", str(dataset), *common]) == 0
    assert "accuracy" in capsys.readouterr().out
    image = next((dataset / "val" / "red").iterdir())
    assert main(["predict", "--weights", str(ckpt), "--arch", "resnet18", "--classes", "dogs,wolves", str(image),
                 "--format", "csv", *common]) == 0
    out = capsys.readouterr().out
    assert str(image) in out and ("dogs:" in out and "wolves:" in out)
    assert main(["predict", "--weights", str(ckpt), "--arch", "resnet18", "--classes", "a,b,c", str(image)]) == 2
    assert "3 class names (a, b, c) do not fit the 2 outputs" in capsys.readouterr().err


def test_convert_between_every_format_keeps_the_tensors(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    src = randomize_bn(create_model("resnet18", num_classes=2, padding="same"))
    ckpt = mindspore_ckpt(tmp_path / "in.ckpt", src)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = src(x)
    assert main(["convert", str(ckpt), str(tmp_path / "hs.safetensors"), "--arch", "resnet18",
                 "--classes", "dogs,wolves"]) == 0
    out = capsys.readouterr().out
    assert "skipped 3 tensors that are not weights: moments.fc.weight, learning_rate, global_step" in out
    hs = open_model(tmp_path / "hs")
    assert hs.classes == ["dogs", "wolves"] and hs.meta["arch_kwargs"] == {"padding": "same"}
    with torch.no_grad():
        torch.testing.assert_close(hs.model(x), expected, atol=0, rtol=0)
    # headstart -> MindSpore: the same tensors as the original file, without the optimizer state
    r = convert(tmp_path / "hs.safetensors", tmp_path / "back.ckpt")
    assert r.format == "mindspore" and r.tensors == len(read_ckpt(ckpt)) - 3 and r.notes == ["class order for the MindSpore head: dogs, wolves"]
    original, back = read_ckpt(ckpt), read_ckpt(tmp_path / "back.ckpt")
    assert set(back) == set(original) - {"moments.fc.weight", "learning_rate", "global_step"}
    for k in back:
        np.testing.assert_array_equal(back[k], original[k])
    # plain safetensors and .pth keep the tensors; the .pth says what it cannot hold
    convert(tmp_path / "hs.safetensors", tmp_path / "plain.safetensors", to="safetensors")
    assert load_weights_file(tmp_path / "plain.safetensors").model_kwargs == {"padding": "same"}
    r = convert(tmp_path / "hs.safetensors", tmp_path / "w.pth")
    assert any("class names" in n for n in r.notes) and any("padding" in n for n in r.notes)
    sd = torch.load(tmp_path / "w.pth", weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in hs.model.state_dict().items())
    assert open_model(tmp_path / "plain.safetensors", arch="resnet18").classes == ["dogs", "wolves"]


@pytest.mark.slow
def test_a_pth_written_by_convert_builds_the_same_network_back(tmp_path: Path) -> None:
    """Issue 25, 5: a checkpoint converted to .pth and back lost ResNet50's stride_in_1x1 (the tensors cannot
    show it: it moves a stride between two convs of the same shapes), and built another network silently."""
    from headstart.data.transforms import Preprocessing
    from headstart.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    v1 = randomize_bn(create_model("resnet50", num_classes=2, stride_in_1x1=True)).eval()
    save_checkpoint(tmp_path / "v1", v1, classes=["ants", "bees"], preprocessing=Preprocessing(image_size=64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = v1(x)
    convert(tmp_path / "v1.safetensors", tmp_path / "w.pth")
    assert (tmp_path / "w.pth.json").is_file()
    back = convert(tmp_path / "w.pth", tmp_path / "back.safetensors")
    assert back.arch == "resnet50" and back.classes == ["ants", "bees"]
    model = open_model(tmp_path / "back.safetensors")
    assert model.meta["arch_kwargs"] == {"stride_in_1x1": True} and model.preprocessing.image_size == 64
    with torch.no_grad():
        torch.testing.assert_close(model.model(x), expected, atol=0, rtol=0)
    # A .pth alone (torchvision's kind) is torchvision's network: other logits, which is why the file goes with it.
    (tmp_path / "w.pth.json").unlink()
    with torch.no_grad():
        assert not torch.allclose(open_model(tmp_path / "w.pth").model(x), expected, atol=1e-3)


def test_convert_refuses_what_mindspore_cannot_hold(tmp_path: Path) -> None:
    from headstart.data.transforms import Preprocessing
    from headstart.io.checkpoint import save_checkpoint

    v1 = create_model("resnet18", num_classes=2, stride_in_1x1=True)
    save_checkpoint(tmp_path / "v1", v1, classes=["a", "b"], preprocessing=Preprocessing())
    with pytest.raises(ValueError, match="stride in the first 1x1 conv"):
        convert(tmp_path / "v1.safetensors", tmp_path / "v1.ckpt")
    tiny = create_model("tiny", num_classes=2)
    save_checkpoint(tmp_path / "tiny", tiny, classes=["a", "b"], preprocessing=Preprocessing(image_size=32))
    with pytest.raises(ValueError, match="only ResNets convert"):
        convert(tmp_path / "tiny.safetensors", tmp_path / "tiny.ckpt")
    with pytest.raises(ValueError, match="cannot tell the output format from .*x.onnx"):
        convert(tmp_path / "tiny.safetensors", tmp_path / "x.onnx")
    assert not (tmp_path / "v1.ckpt").exists() and not (tmp_path / "tiny.ckpt").exists()
    r = convert(tmp_path / "tiny.safetensors", tmp_path / "tiny.pth")  # torch layout: fine
    assert r.tensors == len(tiny.state_dict())


# ---------------------------------------------------------------------------------------------
# Real MindSpore (CI installs mindspore==2.10.0 with numpy<2 into .venv-mindspore).

def mindspore_python() -> str:
    python = os.environ.get("HEADSTART_MINDSPORE_PYTHON") or str(ROOT / ".venv-mindspore" / "bin" / "python")
    if not Path(python).exists():
        if os.environ.get("HEADSTART_REQUIRE_MINDSPORE"):
            pytest.fail(f"MindSpore is required here (HEADSTART_REQUIRE_MINDSPORE) but {python} does not exist")
        pytest.skip("MindSpore is not installed (.ci/run installs it into .venv-mindspore)")
    return python


def run_mindspore(*args: str) -> None:
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "GLOG_v": "3"}  # MindSpore's slow path otherwise
    out = subprocess.run([mindspore_python(), str(ROOT / "tests" / "mindspore_side.py"), *args], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_round_trip_with_real_mindspore(tmp_path: Path) -> None:
    # MindSpore -> headstart: the tutorial's ResNet50 with random weights, saved by MindSpore itself
    run_mindspore("make", str(tmp_path))
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    ms_logits = torch.from_numpy(np.load(tmp_path / "ms_logits.npy"))
    loaded = load_weights_file(tmp_path / "ms.ckpt")
    assert loaded.skipped == ["learning_rate", "global_step"]
    model = create_model("resnet50", weights=tmp_path / "ms.ckpt").eval()
    with torch.no_grad():
        ours = model(x)
        torchvision_padding = create_model("resnet50", num_classes=2).eval()
        torchvision_padding.load_state_dict(model.state_dict())
        symmetric = torchvision_padding(x)
    assert (ours - ms_logits).abs().max() < 1e-3, (ours, ms_logits)
    assert (symmetric - ms_logits).abs().max() > 1e-2  # the padding matters: the check can fail
    assert (ms_logits[0] - ms_logits[1]).abs().max() > 1e-2  # and the logits depend on the input
    # headstart -> MindSpore: another random net, converted, loaded strictly by MindSpore
    torch.manual_seed(1)
    net = randomize_bn(create_model("resnet50", num_classes=2, padding="same"))
    with torch.no_grad():
        net.fc.weight.normal_(0, 0.1)
        ours = net(x)
    from headstart.data.transforms import Preprocessing
    from headstart.io.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "hs", net, classes=["dogs", "wolves"], preprocessing=Preprocessing())
    assert main(["convert", str(tmp_path / "hs.safetensors"), str(tmp_path / "hs.ckpt")]) == 0
    run_mindspore("load", str(tmp_path / "hs.ckpt"), str(tmp_path / "x.npy"), str(tmp_path / "out.npy"))
    theirs = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert (ours - theirs).abs().max() < 1e-3, (ours, theirs)
    assert (ours[0] - ours[1]).abs().max() > 1e-2


@pytest.mark.parametrize("channels_last", [False, True])
def test_pad_same_equals_f_pad_keeps_the_memory_format_and_passes_gradients(channels_last: bool) -> None:
    from headstart.models.layers import pad_same

    for shape, kernel, stride in [((2, 3, 7, 9), 3, 2), ((1, 4, 224, 224), 7, 2), ((2, 5, 8, 8), 5, 2),
                                  ((2, 5, 8, 8), 3, 1), ((2, 5, 8, 8), 1, 2)]:
        x = torch.randn(shape)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        (top, bottom), (left, right) = same_padding(shape[2], kernel, stride), same_padding(shape[3], kernel, stride)
        out = pad_same(x, kernel, stride, value=-2.0)
        assert torch.equal(out, torch.nn.functional.pad(x, (left, right, top, bottom), value=-2.0))
        (out * torch.arange(out.shape[-1], dtype=out.dtype)).sum().backward()
        assert torch.equal(x.grad, torch.arange(left, left + shape[3], dtype=x.dtype).expand(shape))
        if channels_last and top + bottom + left + right:
            # a channels_last BatchNorm backward given a default-format gradient is several times slower
            assert out.is_contiguous(memory_format=torch.channels_last)
            assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_feature_cache_key_tells_paddings_apart() -> None:
    """The same tensors in a ResNet that pads the other way give other features: another cache key."""
    from headstart.io.weights import weights_fingerprint

    torch.manual_seed(0)
    a = create_model("resnet18", num_classes=2)
    b = create_model("resnet18", num_classes=2, padding="same")
    c = create_model("resnet18", num_classes=2, stride_in_1x1=True)
    b.load_state_dict(a.state_dict())
    c.load_state_dict(a.state_dict())
    assert len({weights_fingerprint(m) for m in (a, b, c)}) == 3
    d = create_model("resnet18", num_classes=5)
    d.load_state_dict({k: v for k, v in a.state_dict().items() if not k.startswith("fc.")}, strict=False)
    assert weights_fingerprint(d) == weights_fingerprint(a)  # the head is not part of the key
