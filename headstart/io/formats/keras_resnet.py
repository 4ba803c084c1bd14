"""Keras `ResNet50(weights='imagenet')` weights -> headstart's ResNet50 (stride_in_1x1=True).

Keras names: `conv1` + `bn_conv1`; blocks `res{S}{B}_branch{2a,2b,2c}` + `bn{S}{B}_branch...`, with
the projection `res{S}a_branch1`; stages S = 2..5 are layer1..4, blocks B = a, b, c... are 0, 1, 2...;
`fc1000` is the classifier. Conv kernels are HWIO, the Dense kernel is [in, out].

Three things are folded so that the result is a plain torchvision-layout state dict:
- every conv has a bias: it moves into the following BatchNorm's running mean;
- BatchNorm epsilon is 1e-3 in Keras and 1e-5 in torch: the difference moves into the running var;
- the Caffe input convention (BGR, 0-255, minus the per-channel mean) moves into conv1, so the model
  takes RGB images normalised with the given mean/std, like every other backbone here.
"""

from __future__ import annotations

import numpy as np
import torch

KERAS_BN_EPS = 1e-3
TORCH_BN_EPS = 1e-5
CAFFE_MEAN_RGB = (123.68, 116.779, 103.939)  # Keras "caffe" mode subtracts these from R, G, B
RESNET50_BLOCKS = (3, 4, 6, 3)


def _conv_bn(w: dict[str, np.ndarray], conv: str, bn: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Keras conv + BN -> (OIHW kernel, torch BN tensors with the conv bias folded in)."""
    try:
        kernel, bias = w[f"{conv}/kernel"], w[f"{conv}/bias"]
        gamma, beta = w[f"{bn}/gamma"], w[f"{bn}/beta"]
        mean, var = w[f"{bn}/moving_mean"], w[f"{bn}/moving_variance"]
    except KeyError as e:
        raise ValueError(f"not Keras ResNet50 weights: {e.args[0]!r} is missing") from None
    return kernel.transpose(3, 2, 0, 1), {
        "weight": gamma,
        "bias": beta,
        "running_mean": mean - bias,
        "running_var": var + (KERAS_BN_EPS - TORCH_BN_EPS),
    }


def keras_resnet50_to_torch(w: dict[str, np.ndarray], *, mean: tuple[float, float, float],
                            std: tuple[float, float, float]) -> dict[str, torch.Tensor]:
    """Map Keras ResNet50 weights (as read by `read_tfjs_weights`) onto a ResNet50 state dict
    (stride_in_1x1=True, 1000-class `fc`) that takes RGB inputs normalised with `mean` and `std`."""
    sd: dict[str, np.ndarray] = {}

    def put(prefix: str, kernel: np.ndarray, bn: dict[str, np.ndarray], bn_prefix: str) -> None:
        sd[f"{prefix}.weight"] = kernel
        for k, v in bn.items():
            sd[f"{bn_prefix}.{k}"] = v

    # Stem, with the Caffe input convention folded in. Keras conv1 sees x_bgr[2-c] = 255*std[c]*x[c]
    # + (255*mean[c] - caffe[c]) for our normalised RGB input x, so the kernel is flipped to RGB and
    # scaled per channel, and the constant term joins the bias (then the BN mean).
    kernel, bn = _conv_bn(w, "conv1", "bn_conv1")  # (64, 3, 7, 7), channels in BGR order
    kernel = kernel[:, ::-1].astype(np.float64)
    scale = 255.0 * np.asarray(std, dtype=np.float64)
    shift = 255.0 * np.asarray(mean, dtype=np.float64) - np.asarray(CAFFE_MEAN_RGB)
    extra_bias = (kernel.sum(axis=(2, 3)) * shift).sum(axis=1)  # (64,)
    bn["running_mean"] = bn["running_mean"] - extra_bias
    put("conv1", (kernel * scale[None, :, None, None]).astype(np.float32), bn, "bn1")

    for stage, blocks in enumerate(RESNET50_BLOCKS, start=2):
        for b in range(blocks):
            keras_block = f"{stage}{chr(ord('a') + b)}"
            ours = f"layer{stage - 1}.{b}"
            for i, branch in enumerate(("2a", "2b", "2c"), start=1):
                kernel, bn = _conv_bn(w, f"res{keras_block}_branch{branch}", f"bn{keras_block}_branch{branch}")
                put(f"{ours}.conv{i}", kernel, bn, f"{ours}.bn{i}")
            if b == 0:
                kernel, bn = _conv_bn(w, f"res{keras_block}_branch1", f"bn{keras_block}_branch1")
                put(f"{ours}.downsample.0", kernel, bn, f"{ours}.downsample.1")

    try:
        sd["fc.weight"] = w["fc1000/kernel"].T
        sd["fc.bias"] = w["fc1000/bias"]
    except KeyError as e:
        raise ValueError(f"not Keras ResNet50 weights: {e.args[0]!r} is missing") from None
    out = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C")) for k, v in sd.items()}
    for k in list(out):
        if k.endswith(".running_var"):
            out[k[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out
