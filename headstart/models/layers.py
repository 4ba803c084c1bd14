"""TensorFlow-style "same" padding, shared by the backbones whose weights were trained with it.

TF (and MindSpore's pad_mode='same') pads a layer so that the output is ceil(n / stride) long:
the total padding is max((ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0), split with the smaller
half first (top/left). For stride 1 that is torch's symmetric padding; for stride 2 on an even size
it is one pixel less, all of it after: a 3x3/2 conv on 56x56 pads 0 before and 1 after, where
torch's padding=1 pads 1 and 1 and every output pixel sees a window shifted by one.

A module that calls `pad_same` registers it with `torch.fx.wrap("pad_same")` at its top level (fx
patches that module's globals), so the model still traces and its convs still fold with their
BatchNorms (see Runtime.inference_model).
"""

from __future__ import annotations

import torch


def same_padding(n: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """(before, after) padding of one axis of length n, as TF's padding='SAME' computes it."""
    total = max((-(-n // stride) - 1) * stride + (kernel - 1) * dilation + 1 - n, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int, dilation: int = 1, value: float = 0.0) -> torch.Tensor:
    """Pad (N, C, H, W) `x` for a kernel x kernel window with TF's 'SAME' rule (use `value=-inf`
    before a max pool). The result, and its gradient, keep x's memory format."""
    top, bottom = same_padding(x.shape[-2], kernel, stride, dilation)
    left, right = same_padding(x.shape[-1], kernel, stride, dilation)
    if top == bottom == left == right == 0:
        return x
    if torch.jit.is_tracing():  # an exported graph (OpenVINO, see runtime/openvino.py) wants the standard op
        return torch.nn.functional.pad(x, (left, right, top, bottom), value=value)
    return _PadSame.apply(x, (top, bottom, left, right), value)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


class _PadSame(torch.autograd.Function):
    """F.pad fills the whole output and then copies x in (one memory pass more than writing the
    border strips and x once), and autograd's gradient of a slice assignment comes back in the
    default memory format, which sends a channels_last BatchNorm backward down a path several
    times slower (an EfficientNet-Lite0 training step: 7.7 -> 14-15 img/s here)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pads: tuple[int, int, int, int], value: float) -> torch.Tensor:
        top, bottom, left, right = pads
        n, c, h, w = x.shape
        ctx.box, ctx.fmt = (top, h, left, w), _memory_format(x)
        out = torch.empty((n, c, h + top + bottom, w + left + right), dtype=x.dtype, device=x.device,
                          memory_format=ctx.fmt)
        out[:, :, :top].fill_(value)
        out[:, :, top + h:].fill_(value)
        out[:, :, top:top + h, :left].fill_(value)
        out[:, :, top:top + h, left + w:].fill_(value)
        out[:, :, top:top + h, left:left + w] = x
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        top, h, left, w = ctx.box
        return grad[:, :, top:top + h, left:left + w].contiguous(memory_format=ctx.fmt), None, None
