"""The OpenVINO inference engine: same outputs as PyTorch, the choice of engine, the fallback, no telemetry."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from headstart.data.transforms import Preprocessing
from headstart.infer.prediction import predict
from headstart.io.checkpoint import save_checkpoint
from headstart.models import create_model
from headstart.runtime.device import resolve_runtime
from headstart.runtime.openvino import MIN_IMAGES, OpenVINOModel, graph_key, openvino_available

pytestmark = pytest.mark.skipif(not openvino_available() and not os.environ.get("HEADSTART_REQUIRE_OPENVINO"),
                                reason="openvino is not installed (it is a dependency on x86-64)")


def with_bn_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine terms, so that a wrong fusion shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.4 + 0.8)
    return model.eval()


@pytest.mark.parametrize("arch,kwargs", [("tiny", {}), ("resnet18", {"padding": "same"}),
                                         ("resnet18", {"stride_in_1x1": True}), ("mobilenet_v2", {}),
                                         ("efficientnet_lite0", {})])
@pytest.mark.slow
def test_openvino_fp32_matches_pytorch_for_every_family(arch: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    model = with_bn_statistics(create_model(arch, num_classes=3, **kwargs))
    runtime = resolve_runtime(precision="fp32", engine="openvino")
    fast = runtime.inference_model(model)
    feats = runtime.inference_model(model, features=True)
    assert isinstance(fast, OpenVINOModel) and isinstance(feats, OpenVINOModel)
    for n, size in ((5, 64), (2, 64), (3, 65)):  # any batch size; a new image size compiles again
        x = torch.randn(n, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), model(x), atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(feats(x), model.forward_features(x), atol=1e-4, rtol=1e-4)
    assert not fast.fell_back and fast.compiled_shapes == [(3, 64, 64), (3, 65, 65)]


def test_pipeline_answers_every_batch_in_order() -> None:
    """Batches split into one chunk per stream, several in flight: each answer must come back
    whole, with its own tag, in the order given, whatever the batch sizes and image sizes."""
    torch.manual_seed(0)
    model = with_bn_statistics(create_model("resnet18", num_classes=3))
    runtime = resolve_runtime(precision="fp32", engine="openvino")
    fast = runtime.inference_model(model)
    sizes = [(5, 64), (1, 64), (8, 64), (3, 48), (2, 64), (7, 64), (1, 48), (4, 64)]
    batches = [(f"b{i}", torch.randn(n, 3, s, s)) for i, (n, s) in enumerate(sizes)]
    out = list(runtime.outputs(fast, iter(batches)))
    if torch.get_num_threads() >= 2:  # a stream per thread: batches were split and queued
        assert fast.streams >= 2
    assert [tag for tag, _ in out] == [tag for tag, _ in batches]
    with torch.no_grad():
        for (_, x), (_, y) in zip(batches, out):
            torch.testing.assert_close(y, model(x), atol=1e-4, rtol=1e-4)
    assert fast.in_flight == 0  # every request taken back

    def failing():  # a loader that breaks down with batches in flight
        yield from batches[:3]
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(runtime.outputs(fast, failing()))
    stopped = runtime.outputs(fast, iter(batches))
    next(stopped)
    stopped.close()  # a caller that stops early
    assert fast.in_flight == 0  # every request taken back, after the failure and the early stop
    with torch.no_grad():
        torch.testing.assert_close(fast(batches[0][1]), model(batches[0][1]), atol=1e-4, rtol=1e-4)


def test_openvino_bf16_stays_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = with_bn_statistics(create_model("resnet18", num_classes=10))
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        out = resolve_runtime(precision="bf16", engine="openvino").inference_model(model)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()  # bf16 keeps 8 bits of mantissa
    assert (out.argmax(1) == ref.argmax(1)).all()


@torch.library.custom_op("headstart_test::opaque", mutates_args=())
def _opaque(x: torch.Tensor) -> torch.Tensor:  # an op OpenVINO has never heard of
    return x * 2


class _Unconvertible(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _opaque(self.conv(x)).mean((2, 3))


def test_a_network_openvino_cannot_convert_runs_in_pytorch(caplog) -> None:
    torch.manual_seed(0)
    model = _Unconvertible().eval()
    fast = resolve_runtime(precision="fp32", engine="openvino").inference_model(model)
    x = torch.randn(2, 3, 16, 16)
    with caplog.at_level(logging.WARNING, logger="headstart.runtime.openvino"), torch.no_grad():
        out = fast(x)
        again = fast(x)
    assert "OpenVINO could not convert _Unconvertible" in caplog.text and "running it in PyTorch" in caplog.text
    assert caplog.text.count("could not convert") == 1  # said once
    assert fast.fell_back
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(again, out)
    runtime = resolve_runtime(precision="fp32", engine="openvino")
    batches = [(n, torch.randn(n, 3, 16, 16)) for n in (3, 1, 2)]
    for (n, x), (tag, y) in zip(batches, runtime.outputs(runtime.inference_model(model), iter(batches)), strict=True):
        assert tag == n
        torch.testing.assert_close(y, model(x))


def test_engine_choice_and_its_errors() -> None:
    auto = resolve_runtime(precision="fp32")
    assert auto.engine == "openvino" and auto.min_images == MIN_IMAGES
    model = create_model("tiny", num_classes=2)
    assert not isinstance(auto.inference_model(model, images=MIN_IMAGES - 1), OpenVINOModel)  # would not pay
    assert isinstance(auto.inference_model(model, images=MIN_IMAGES), OpenVINOModel)
    named = resolve_runtime(precision="fp32", engine="openvino")
    assert isinstance(named.inference_model(model, images=1), OpenVINOModel)  # asked for by name: always
    assert resolve_runtime(precision="fp16").engine == "torch"  # auto: OpenVINO runs fp32 or bf16
    assert resolve_runtime(compile=True).engine == "torch"
    assert auto.describe().endswith(f", OpenVINO for inference of {MIN_IMAGES}+ images")
    assert named.describe().endswith(", inference in OpenVINO")
    with pytest.raises(ValueError, match=r"engine 'onnx' is not one of \('auto', 'torch', 'openvino'\)"):
        resolve_runtime(engine="onnx")
    with pytest.raises(ValueError, match="runs fp32 or bf16, not 'fp16'; or use --engine torch"):
        resolve_runtime(precision="fp16", engine="openvino")
    with pytest.raises(ValueError, match="--compile is for the torch engine"):
        resolve_runtime(compile=True, engine="openvino")


def test_predict_gives_the_same_answers_with_either_engine(dataset: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = with_bn_statistics(create_model("tiny", num_classes=2))
    ckpt = save_checkpoint(tmp_path / "ck", model, classes=["blue", "red"], preprocessing=Preprocessing(image_size=32))
    kw = dict(precision="fp32", workers=0, batch_size=7)
    a = predict(ckpt, [dataset], engine="openvino", **kw)
    b = predict(ckpt, [dataset], engine="torch", **kw)
    assert len(a) == len(b) == 36
    assert [p.path for p in a] == [p.path for p in b]
    assert [p.label for p in a] == [p.label for p in b]
    assert max(abs(p.probability - q.probability) for p, q in zip(a, b)) < 1e-4


def test_openvino_sends_no_telemetry_and_leaves_the_signal_stack_alone(tmp_path: Path) -> None:
    """Importing openvino's conversion tools sends a usage event unless the user opted out (a
    consent file under ~/intel); headstart hides the telemetry module, so nothing is created or sent.
    The CPU plugin's start sets a small signal stack on the calling thread, which Python's signal
    handlers then used (the test suite died of a SIGSEGV in a SIGCHLD): it is put back."""
    code = (
        "import ctypes, faulthandler, sys, torch\n"
        "from headstart.runtime.openvino import _StackT\n"
        "from headstart.models import create_model\n"
        "from headstart.runtime.device import resolve_runtime\n"
        "def altstack():\n"
        "    s = _StackT()\n"
        "    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s)) == 0\n"
        "    return s.ss_sp, s.ss_flags, s.ss_size\n"
        "faulthandler.enable()  # sets a signal stack of its own\n"
        "before = altstack()\n"
        "runtime = resolve_runtime(precision='fp32', engine='openvino')\n"
        "m = runtime.inference_model(create_model('tiny', num_classes=2))\n"
        "m(torch.randn(1, 3, 32, 32))\n"
        "assert not m.fell_back, 'not converted'\n"
        "assert altstack() == before, (altstack(), before)\n"
        "assert sys.modules.get('openvino_telemetry') is None, 'telemetry imported'\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "CI": ""}  # CI=true would switch it off by itself
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not (tmp_path / "intel").exists()


@pytest.mark.slow
def test_int8_quantization_sends_no_telemetry_either(tmp_path: Path) -> None:
    """NNCF reports usage through the same module; headstart imports it after hiding that module."""
    from .conftest import needs_nncf

    needs_nncf()
    code = (
        "import sys, numpy as np, torch\n"
        "from headstart.runtime.openvino import convert_to_openvino, quantize_int8\n"
        "from headstart.models import create_model\n"
        "model = create_model('tiny', num_classes=2).eval().requires_grad_(False)\n"
        "graph = convert_to_openvino(model, torch.zeros(1, 3, 32, 32))\n"
        "rng = np.random.default_rng(0)\n"
        "quantize_int8(graph, [rng.random((1, 3, 32, 32), dtype=np.float32) for _ in range(4)])\n"
        "assert sys.modules.get('openvino_telemetry') is None, 'telemetry imported'\n"
    )
    env = {**os.environ, "HOME": str(tmp_path), "CI": ""}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    assert not (tmp_path / "intel").exists()


@pytest.mark.slow
def test_converted_graphs_are_kept_on_disk_and_reused(headstart_home: Path, monkeypatch, caplog) -> None:
    torch.manual_seed(0)
    model = with_bn_statistics(create_model("resnet18", num_classes=3))
    runtime = resolve_runtime(precision="fp32", engine="openvino")
    x = torch.randn(3, 3, 64, 64)
    with caplog.at_level(logging.INFO, logger="headstart.runtime.openvino"), torch.no_grad():
        first = runtime.inference_model(model)(x)
        again = runtime.inference_model(model)(x)  # a new copy, as a later run would make
    assert "converted and compiled" in caplog.messages[0] and "read from" in caplog.messages[1]
    assert torch.equal(first, again)  # the same graph, bit for bit
    torch.testing.assert_close(again, model(x), atol=1e-4, rtol=1e-4)
    entries = list((headstart_home / "openvino").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.bin").stat().st_size > 4 * 11_000_000  # fp32 weights

    # Whatever changes the graph changes the key: a weight, a layer setting, the input size.
    key = graph_key(model, (3, 64, 64))
    other = create_model("resnet18", num_classes=3)
    other.load_state_dict(model.state_dict())
    assert graph_key(other, (3, 64, 64)) != key  # train mode
    assert graph_key(other.eval(), (3, 64, 64)) == key
    assert graph_key(other, (3, 65, 64)) != key
    with torch.no_grad():
        other.fc.bias[0] += 1
    assert graph_key(other, (3, 64, 64)) != key
    strided = create_model("resnet18", num_classes=3, stride_in_1x1=True).eval()
    strided.load_state_dict(model.state_dict())
    assert graph_key(strided, (3, 64, 64)) != key

    # A damaged entry is converted again; only the CACHE_ENTRIES most recently used are kept.
    (entries[0] / "model.bin").write_bytes(b"\0" * 100)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="headstart.runtime.openvino"), torch.no_grad():
        torch.testing.assert_close(runtime.inference_model(model)(x), first)
    assert "ignoring the unreadable converted graph" in caplog.text and "converted and compiled" in caplog.text
    monkeypatch.setattr("headstart.runtime.openvino.CACHE_ENTRIES", 2)
    for size in (33, 34, 35):
        with torch.no_grad():
            runtime.inference_model(model)(torch.randn(1, 3, size, size))
    kept = sorted(p.name for p in (headstart_home / "openvino").iterdir())
    assert len(kept) == 2 and kept == sorted(graph_key(model, (3, s, s)) for s in (34, 35))


def test_validation_in_training_keeps_no_graph(dataset: Path, tmp_path: Path, headstart_home: Path) -> None:
    """The weights change every epoch: their graphs would only push useful ones out of the cache."""
    from headstart.training import TrainConfig, train

    config = TrainConfig(arch="tiny", weights=None, strategy="finetune", epochs=2, batch_size=8, workers=0, image_size=32,
                         engine="openvino", precision="fp32")
    result = train(dataset, out=tmp_path / "run", config=config)
    assert not (headstart_home / "openvino").exists() or not any((headstart_home / "openvino").iterdir())
    # Validation ran in OpenVINO: its figures are those of the same weights in PyTorch.
    from headstart.infer.evaluation import evaluate

    best = evaluate(result.best_checkpoint, dataset, workers=0, precision="fp32", engine="torch")
    assert best.accuracy == result.best_val_acc
    t = result.limits.temperature  # (evaluate's loss is at the checkpoint's temperature)
    val = result.val_inference
    assert best.loss == pytest.approx(float(torch.nn.functional.cross_entropy(val.outputs / t, val.labels)), abs=1e-4)
    assert result.history[result.best_epoch - 1].val_loss == pytest.approx(
        float(torch.nn.functional.cross_entropy(val.outputs, val.labels)), abs=1e-6)
    with torch.no_grad():  # while a model's own inference keeps its graph
        resolve_runtime(precision="fp32", engine="openvino").inference_model(
            create_model("tiny", num_classes=2))(torch.randn(1, 3, 32, 32))
    assert len(list((headstart_home / "openvino").iterdir())) == 1
