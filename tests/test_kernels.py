"""The fused BatchNorm + activation + add kernel: PyTorch's results to bf16 rounding, BatchNorm's
bookkeeping, the fallback when it cannot be built, and the networks still folding their BatchNorms
for inference."""

from __future__ import annotations

import copy
import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import headstart.models.kernels as kernels
from headstart.models import create_model
from headstart.models.kernels import batch_norm_act, kernels_available
from headstart.runtime.device import resolve_runtime

CL = torch.channels_last
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the kernels")


def make_bn(c: int, seed: int = 0, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, eps=1e-3, momentum=momentum)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g) * 0.5)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn.train()


def bf16_cl(*shape: int, seed: int, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + offset).to(torch.bfloat16).contiguous(memory_format=CL)


def run(bn: nn.BatchNorm2d, x: torch.Tensor, dy: torch.Tensor, act: str | None, residual: torch.Tensor | None,
        fn=batch_norm_act) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients (x, weight, bias[, residual]) of fn."""
    x = x.detach().requires_grad_()
    inputs = [x, bn.weight, bn.bias]
    if residual is not None:
        residual = residual.detach().requires_grad_()
        inputs.append(residual)
    y = fn(bn, x, act=act, residual=residual)
    return y, list(torch.autograd.grad(y, inputs, dy.to(y.dtype)))


def reference(bn: nn.BatchNorm2d, x: torch.Tensor, *, act: str | None, residual: torch.Tensor | None) -> torch.Tensor:
    """The same computation in fp32 throughout."""
    y = F.batch_norm(x.float(), bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True, 0.1, bn.eps)
    if residual is not None:
        y = y + residual.float()
    return {"relu": F.relu, "relu6": F.relu6, None: lambda t: t}[act](y)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@needs_compiler
@pytest.mark.parametrize("act,with_residual", [("relu", False), ("relu", True), (None, False), (None, True),
                                                ("relu6", False), ("relu6", True)])
@pytest.mark.parametrize("shape", [(4, 32, 6, 6), (3, 24, 5, 7)])  # C not a multiple of 16, odd rows
def test_fused_matches_pytorch(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], act: str | None,
                               with_residual: bool) -> None:
    assert kernels_available()
    # A mean far from zero against the spread: the variance must not cancel (sums about shift0).
    x = bf16_cl(*shape, seed=1, scale=2.0, offset=30.0)
    residual = bf16_cl(*shape, seed=2) if with_residual else None
    dy = bf16_cl(*shape, seed=3)
    fused_bn, torch_bn, ref_bn = make_bn(shape[1]), make_bn(shape[1]), make_bn(shape[1])
    if act == "relu6":  # outputs on both sides of 6
        for bn in (fused_bn, torch_bn, ref_bn):
            bn.weight.data.mul_(6.0)

    y, grads = run(fused_bn, x, dy, act, residual)
    assert type(y.grad_fn).__name__ == "_BatchNormActBackward"  # the kernel ran
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=CL)
    monkeypatch.setenv("HEADSTART_KERNELS", "0")
    y_pt, grads_pt = run(torch_bn, x, dy, act, residual)
    assert type(y_pt.grad_fn).__name__ != "_BatchNormActBackward"
    y_ref, grads_ref = run(ref_bn, x, dy, act, residual, fn=reference)

    # No further from fp32 than PyTorch's own bf16 path (which rounds twice when there is a residual).
    for ours, pt, ref in zip([y, *grads], [y_pt, *grads_pt], [y_ref, *grads_ref]):
        assert ours.shape == ref.shape
        assert rel(ours, ref) <= max(1.5 * rel(pt, ref), 4e-3), (rel(ours, ref), rel(pt, ref))
    # BatchNorm's bookkeeping, as nn.BatchNorm2d keeps it (running variance unbiased).
    assert int(fused_bn.num_batches_tracked) == int(torch_bn.num_batches_tracked) == 1
    torch.testing.assert_close(fused_bn.running_mean, torch_bn.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused_bn.running_var, torch_bn.running_var, rtol=1e-3, atol=1e-4)


@needs_compiler
def test_cumulative_average_and_frozen_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """momentum=None (a cumulative average over batches), and an input that needs no gradient."""
    x1, x2, dy = bf16_cl(2, 16, 4, 4, seed=4), bf16_cl(2, 16, 4, 4, seed=5, offset=1.0), bf16_cl(2, 16, 4, 4, seed=6)
    fused, plain = make_bn(16, momentum=None), make_bn(16, momentum=None)
    grads = {}
    for bn, flag in ((fused, "1"), (plain, "0")):
        monkeypatch.setenv("HEADSTART_KERNELS", flag)
        batch_norm_act(bn, x1, act="relu")
        y = batch_norm_act(bn, x2, act="relu")  # x2 does not require grad: only weight and bias get one
        assert (type(y.grad_fn).__name__ == "_BatchNormActBackward") == (flag == "1")
        grads[flag] = torch.autograd.grad(y, [bn.weight, bn.bias], dy)
    assert int(fused.num_batches_tracked) == 2
    torch.testing.assert_close(fused.running_mean, plain.running_mean, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.running_var, plain.running_var, rtol=1e-3, atol=1e-4)
    for a, b in zip(grads["1"], grads["0"]):
        assert rel(a, b) < 2e-2


def test_other_inputs_run_pytorchs_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32, NCHW and eval mode are not the kernel's: the module runs, unchanged."""
    bn = make_bn(8)
    x32 = torch.randn(2, 8, 4, 4)
    expected = F.relu(copy.deepcopy(bn)(x32))
    torch.testing.assert_close(batch_norm_act(bn, x32, act="relu"), expected)
    for x in (x32.to(torch.bfloat16), x32.to(torch.bfloat16).contiguous(memory_format=CL)):
        with torch.no_grad():
            y = batch_norm_act(bn.eval(), x, act="relu6")
        assert y.grad_fn is None
        torch.testing.assert_close(y, F.relu6(bn(x)))
    with pytest.raises(ValueError, match="'gelu' is not one of"):
        batch_norm_act(bn, x32, act="gelu")


def test_without_a_compiler_it_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-here")
    kernels._library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="headstart.models.kernels"):
            assert not kernels_available()
        assert "no-such-compiler-here" in caplog.text and "PyTorch's ops run instead" in caplog.text
        x = bf16_cl(2, 8, 4, 4, seed=7).requires_grad_()
        y = batch_norm_act(make_bn(8), x, act="relu")
        assert type(y.grad_fn).__name__ != "_BatchNormActBackward"
        y.sum().backward()
        assert x.grad is not None
    finally:
        kernels._library.cache_clear()


@needs_compiler
def test_build_is_cached_per_source_and_cpu(headstart_home) -> None:
    lib = kernels._build("cc")
    assert lib.parent == headstart_home / "kernels" and lib.suffix == ".so"
    before = lib.stat().st_mtime_ns
    assert kernels._build("cc") == lib and lib.stat().st_mtime_ns == before  # not rebuilt
    assert not [p for p in lib.parent.iterdir() if p.name.endswith(".tmp")]


@needs_compiler
# fused: BatchNorms through the kernel per forward (resnet18: stem, 2 per block, 3 shortcuts; mobilenet_v2:
# stem, 3 per block but the first (2), head; efficientnet_lite0: stem, expand + project per block, head)
@pytest.mark.parametrize("arch,kwargs,fused", [("resnet18", {"stride_in_1x1": True}, 20), ("mobilenet_v2", {}, 52),
                                               ("efficientnet_lite0", {}, 33)])
def test_networks_train_with_the_kernel_and_still_fold_for_inference(
        monkeypatch: pytest.MonkeyPatch, arch: str, kwargs: dict, fused: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, num_classes=3, **kwargs).train().to(memory_format=CL)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=CL)
    y = torch.tensor([0, 1, 2, 0])
    calls = []
    apply = kernels._BatchNormAct.apply
    monkeypatch.setattr(kernels._BatchNormAct, "apply", lambda *a: calls.append(1) or apply(*a))

    def grads(m: nn.Module, bf16: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m(x).float()
        return out, list(torch.autograd.grad(F.cross_entropy(out, y), list(m.parameters())))

    fused_model, torch_model = copy.deepcopy(model), copy.deepcopy(model)
    out, g = grads(fused_model)
    assert len(calls) == fused  # every BatchNorm but those after EfficientNet's depthwise convs (fp32)
    monkeypatch.setenv("HEADSTART_KERNELS", "0")
    out_pt, g_pt = grads(torch_model)
    ref_model = copy.deepcopy(model)
    out_ref, g_ref = grads(ref_model, bf16=False)
    assert len(calls) == fused
    # No further from fp32 than PyTorch's own bf16 path: the logits, the typical parameter's gradient,
    # the typical running statistic.
    assert rel(out, out_ref) <= max(1.5 * rel(out_pt, out_ref), 1e-2)
    def stats(m: nn.Module) -> list[torch.Tensor]:
        return [b for b in m.buffers() if b.is_floating_point()]

    for ours, pt, ref in ((g, g_pt, g_ref), (stats(fused_model), stats(torch_model), stats(ref_model))):
        errors = sorted(rel(a, r) for a, r in zip(ours, ref) if r.norm() > 0)
        errors_pt = sorted(rel(a, r) for a, r in zip(pt, ref) if r.norm() > 0)
        assert errors[len(errors) // 2] <= max(1.5 * errors_pt[len(errors) // 2], 1e-3)
    assert [int(a) for a in fused_model.buffers() if a.dtype == torch.int64] == \
        [int(b) for b in torch_model.buffers() if b.dtype == torch.int64]  # num_batches_tracked

    runtime = resolve_runtime(engine="torch")
    inference = runtime.inference_model(fused_model, images=4)
    assert not [m for m in inference.modules() if isinstance(m, nn.BatchNorm2d)]  # all folded into convs
    with torch.no_grad():
        folded = inference(x).float()
        unfolded = fused_model.eval()(x).float()
    torch.testing.assert_close(folded, unfolded, rtol=1e-3, atol=1e-3)
