"""The MindSpore half of the round-trip test; run by tests/test_mindspore.py in an environment that
has MindSpore (it needs numpy<2 and ONEDNN_MAX_CPU_ISA=AVX2 on this CPU), never by pytest itself.

It builds the ResNet50 of the MindSpore transfer-learning tutorial (its layer names, pad_mode='same'
convs without bias, BatchNorm2d with MindSpore's defaults, a 7x7 average pool, a 2-class Dense head):

    python mindspore_side.py make DIR    # random net -> DIR/ms.ckpt, DIR/x.npy, DIR/ms_logits.npy
    python mindspore_side.py load CKPT X.npy OUT.npy   # fresh net, load CKPT strictly, logits -> OUT.npy
"""

import sys

import mindspore as ms
import numpy as np
from mindspore import nn

STAGES = [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]  # (width, blocks, first stride)


class Bottleneck(nn.Cell):
    def __init__(self, cin, width, stride, down_sample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1)
        self.norm1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride)
        self.norm2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1)
        self.norm3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU()
        self.down_sample = down_sample

    def construct(self, x):
        identity = x if self.down_sample is None else self.down_sample(x)
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        return self.relu(out + identity)


def stage(cin, width, blocks, stride):
    down = nn.SequentialCell([nn.Conv2d(cin, width * 4, 1, stride=stride), nn.BatchNorm2d(width * 4)])
    cells = [Bottleneck(cin, width, stride, down)] + [Bottleneck(width * 4, width, 1) for _ in range(blocks - 1)]
    return nn.SequentialCell(cells)


class ResNet50(nn.Cell):
    def __init__(self, num_classes=2):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2)
        self.norm = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.max_pool = nn.MaxPool2d(kernel_size=3, stride=2, pad_mode="same")
        cin = 64
        for i, (width, blocks, stride) in enumerate(STAGES):
            setattr(self, f"layer{i + 1}", stage(cin, width, blocks, stride))
            cin = width * 4
        self.avg_pool = nn.AvgPool2d(kernel_size=7)
        self.flatten = nn.Flatten()
        self.fc = nn.Dense(cin, num_classes)

    def construct(self, x):
        x = self.max_pool(self.relu(self.norm(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avg_pool(x)))


def randomize(net, rng):
    """Random weights and BatchNorm statistics, scaled so that activations stay near unit size and
    the logits depend on the input (each residual branch adds a little to its identity path)."""
    for p in net.get_parameters():
        shape, name = p.shape, p.name
        if name.endswith("norm3.gamma"):
            v = rng.uniform(0.1, 0.3, shape)
        elif name.endswith("gamma"):
            v = rng.uniform(0.8, 1.2, shape)
        elif name.endswith("beta") or name.endswith("moving_mean"):
            v = rng.normal(0, 0.05, shape)
        elif name.endswith("moving_variance"):
            v = rng.uniform(0.8, 1.2, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
            v = rng.normal(0, (2.0 / fan_in) ** 0.5, shape)
        p.set_data(ms.Tensor(v.astype(np.float32)))


def logits(net, x):
    net.set_train(False)
    return net(ms.Tensor(x)).asnumpy()


def main(argv):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    if argv[0] == "make":
        out = argv[1]
        rng = np.random.default_rng(0)
        net = ResNet50()
        randomize(net, rng)
        x = rng.normal(0, 1, (2, 3, 224, 224)).astype(np.float32)
        np.save(f"{out}/x.npy", x)
        np.save(f"{out}/ms_logits.npy", logits(net, x))
        # as a training callback saves it: weights, then optimizer state that a loader must skip
        extra = {"learning_rate": ms.Tensor(np.float32(0.001)), "global_step": ms.Tensor(np.int32(7))}
        ms.save_checkpoint(net, f"{out}/ms.ckpt", append_dict=extra)
    elif argv[0] == "load":
        net = ResNet50()
        params = ms.load_checkpoint(argv[1])
        not_loaded, unused = ms.load_param_into_net(net, params, strict_load=True)
        if not_loaded or unused:
            raise SystemExit(f"{argv[1]}: network parameters not loaded {not_loaded}, unused {unused}")
        np.save(argv[3], logits(net, np.load(argv[2])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
