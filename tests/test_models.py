from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.io.formats.tfjs import read_tfjs_weights
from headstart.io.weights import LoadedWeights, save_weights
from headstart.models import create_model, freeze_backbone, list_models, replace_head


def test_registry_lists_the_resnets_mobilenet_and_tiny() -> None:
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2", "tiny"} <= set(list_models())


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnet05")


@pytest.mark.parametrize("name,features", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnet_shapes(name: str, features: int) -> None:
    m = create_model(name, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert m.forward_features(x).shape == (2, features)
        assert m(x).shape == (2, 3)


def test_torchvision_key_names_and_count() -> None:
    sd = create_model("resnet50").state_dict()
    assert len(sd) == 320  # torchvision's resnet50 state dict has 320 entries
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                "layer4.2.conv3.weight", "layer3.5.bn2.num_batches_tracked", "fc.weight", "fc.bias"):
        assert key in sd, key
    assert sd["fc.weight"].shape == (1000, 2048)


def test_stride_in_1x1_moves_the_stride() -> None:
    v15 = create_model("resnet50")
    v1 = create_model("resnet50", stride_in_1x1=True)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert v1.arch_kwargs == {"stride_in_1x1": True}


def test_head_replacement_and_freezing() -> None:
    m = create_model("tiny", num_classes=10)
    replace_head(m, 4)
    assert m.fc.out_features == 4
    freeze_backbone(m)
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_keeps_or_replaces_the_head(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    src = create_model("tiny", num_classes=10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(src.state_dict(), path)
    else:
        save_weights(path, LoadedWeights(src.state_dict()))
    same = create_model("tiny", weights=path)
    assert torch.equal(same.fc.weight, src.fc.weight)
    new = create_model("tiny", num_classes=3, weights=path)
    assert new.fc.out_features == 3
    assert torch.equal(new.features[0].weight, src.features[0].weight)


def test_weights_that_do_not_fit_are_a_clear_error(tmp_path: Path) -> None:
    save_weights(tmp_path / "w.safetensors", LoadedWeights(create_model("tiny", width=8).state_dict()))
    with pytest.raises(ValueError, match="do not fit tiny"):
        create_model("tiny", weights=tmp_path / "w.safetensors")


def test_missing_weights_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        create_model("tiny", weights=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="tags are"):
        create_model("resnet18", weights="imagenet21k")


def _write_tfjs(folder: Path, arrays: dict[str, np.ndarray], shard_bytes: int = 100) -> Path:
    blob = b"".join(a.astype("<f4").tobytes() for a in arrays.values())
    paths = []
    for i in range(0, len(blob), shard_bytes):
        name = f"group1-shard{i // shard_bytes + 1}.bin"
        (folder / name).write_bytes(blob[i:i + shard_bytes])
        paths.append(name)
    manifest = [{"paths": paths, "weights": [{"name": k, "shape": list(v.shape), "dtype": "float32"}
                                             for k, v in arrays.items()]}]
    (folder / "model.json").write_text(json.dumps({"format": "layers-model", "weightsManifest": manifest}))
    return folder / "model.json"


def test_tfjs_reader_splits_the_shards_back_into_weights(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {"a/kernel": rng.normal(size=(3, 3, 2, 4)), "a/bias": rng.normal(size=4), "b/gamma": rng.normal(size=7)}
    got = read_tfjs_weights(_write_tfjs(tmp_path, arrays))
    assert list(got) == list(arrays)
    for k in arrays:
        np.testing.assert_array_equal(got[k], arrays[k].astype(np.float32))


def test_tfjs_reader_rejects_truncated_shards_and_escaping_paths(tmp_path: Path) -> None:
    path = _write_tfjs(tmp_path, {"a": np.ones(50)})
    shard = tmp_path / "group1-shard2.bin"
    shard.write_bytes(shard.read_bytes()[:-4])
    with pytest.raises(ValueError, match="too few"):
        read_tfjs_weights(path)
    meta = json.loads(path.read_text())
    meta["weightsManifest"][0]["paths"][0] = "../../etc/passwd"
    path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="relative path"):
        read_tfjs_weights(path)


def test_mobilenet_v2_has_torchvision_keys_and_a_dotted_head() -> None:
    m = create_model("mobilenet_v2", num_classes=1000)
    sd = m.state_dict()
    assert len(sd) == 314  # as in torchvision's mobilenet_v2-b0353104.pth
    for key in ("features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                "features.2.conv.3.running_var", "features.18.1.bias", "classifier.1.weight"):
        assert key in sd, key
    with torch.no_grad():
        assert m.eval().forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 1280)
    replace_head(m, 3, classifier="classifier.1")
    assert m.classifier[1].out_features == 3
    freeze_backbone(m, classifier="classifier.1")
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["classifier.1.weight", "classifier.1.bias"]


@pytest.mark.parametrize("variant,keys,blocks,size", [("lite0", 296, 16, 224), ("lite1", 386, 21, 240),
                                                      ("lite2", 386, 21, 260)])
def test_efficientnet_lite_has_the_lukemelas_keys(variant: str, keys: int, blocks: int, size: int) -> None:
    from headstart.models import get_model_info

    m = create_model(f"efficientnet_{variant}", num_classes=1000)
    sd = m.state_dict()
    assert len(sd) == keys and len(m._blocks) == blocks  # as in the .pth files of the PyPI wheels
    for key in ("_conv_stem.weight", "_bn0.running_var", "_blocks.0._depthwise_conv.weight", "_blocks.0._bn2.bias",
                "_blocks.1._expand_conv.weight", "_blocks.1._bn0.weight", "_conv_head.weight", "_bn1.weight",
                "_fc.weight"):
        assert key in sd, key
    assert "_blocks.0._expand_conv.weight" not in sd  # the first block has no expansion
    pre = get_model_info(f"efficientnet_{variant}").preprocessing
    assert (pre.image_size, pre.resize_size, pre.mean, pre.interpolation) == (size, size + 32, (0.5,) * 3, "bicubic")
    with torch.no_grad():
        assert m.eval().forward_features(torch.randn(1, 3, 65, 67)).shape == (1, 1280)  # odd sizes pad TF-style


@pytest.mark.parametrize("name", ["tiny", "resnet18", "mobilenet_v2", "efficientnet_lite0"])
def test_every_family_trains_a_step_in_both_memory_formats(name: str) -> None:
    """In-place activations and TF-style padding must not break autograd."""
    torch.manual_seed(0)
    for channels_last in (False, True):
        m = create_model(name, num_classes=3).train()
        x = torch.randn(4, 3, 64, 64)
        if channels_last:
            m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        loss = torch.nn.functional.cross_entropy(m(x), torch.tensor([0, 1, 2, 0]))
        loss.backward()
        grads = [p.grad for p in m.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name


def test_a_checkpoint_as_weights_keeps_its_architecture_options(tmp_path: Path) -> None:
    """`train --weights runs/x/best.safetensors`: the network is rebuilt as the checkpoint's was
    (here: the stride in the first 1x1 conv), not as the architecture's default."""
    from headstart.data.transforms import Preprocessing
    from headstart.io.checkpoint import save_checkpoint

    torch.manual_seed(0)
    src = create_model("resnet18", num_classes=2, stride_in_1x1=True).eval()
    save_checkpoint(tmp_path / "best", src, classes=["a", "b"], preprocessing=Preprocessing(image_size=64))
    for weights in (tmp_path / "best.safetensors", str(tmp_path / "best")):
        model = create_model("resnet18", num_classes=2, weights=weights).eval()
        assert model.arch_kwargs == {"stride_in_1x1": True}
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(model(x), src(x))
    with pytest.raises(ValueError, match="holds resnet18 weights, not resnet34: pass --arch resnet18"):
        create_model("resnet34", weights=tmp_path / "best.safetensors")
