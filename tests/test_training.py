"""Training, checkpoints, evaluation and prediction on the tiny model and tiny generated data."""

from __future__ import annotations

import csv
import gc
import json
import multiprocessing
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from headstart.analysis.metrics import compute_metrics
from headstart.data.transforms import Preprocessing
from headstart.infer.evaluation import evaluate
from headstart.infer.prediction import predict
from headstart.io.checkpoint import read_checkpoint, save_checkpoint
from headstart.models import create_model, open_model
from headstart.runtime.device import resolve_runtime
from headstart.training import Callback, TrainConfig, train
from headstart.training.strategies import STRATEGIES, FineTune, StrategyInfo, register_strategy

from .conftest import colour_image


def tiny_config(**kw) -> TrainConfig:
    base = dict(arch="tiny", weights=None, strategy="finetune", epochs=2, batch_size=8, lr=0.05, workers=0, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def pretrained_tiny(tmp_path: Path) -> Path:
    """A 'pretrained' tiny backbone: random weights with non-trivial BatchNorm statistics."""
    torch.manual_seed(1)
    m = create_model("tiny", num_classes=10)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    path = tmp_path / "tiny.pth"
    torch.save(m.state_dict(), path)
    return path


@pytest.mark.parametrize("feature_cache", ["off", "disk"])
def test_frozen_backbone_stays_bit_identical(dataset: Path, tmp_path: Path, pretrained_tiny: Path,
                                            feature_cache: str) -> None:
    before = torch.load(pretrained_tiny, weights_only=True)
    result = train(dataset, out=tmp_path / "run", config=tiny_config(
        strategy="frozen", weights=str(pretrained_tiny), epochs=3, feature_cache=feature_cache))
    after = open_model(result.last_checkpoint).model.state_dict()
    changed = [k for k in before if not k.startswith("fc.") and not torch.equal(before[k], after[k])]
    assert changed == []
    # The head did train: a convex problem, so its validation loss falls epoch after epoch.
    val_losses = [r.val_loss for r in result.history]
    assert all(b < a for a, b in zip(val_losses, val_losses[1:])), val_losses
    assert not torch.equal(after["fc.weight"][:2], before["fc.weight"][:2])


def test_finetune_changes_the_backbone_and_learns(dataset: Path, tmp_path: Path, pretrained_tiny: Path) -> None:
    before = torch.load(pretrained_tiny, weights_only=True)
    result = train(dataset, out=tmp_path / "run", config=tiny_config(strategy="finetune", weights=str(pretrained_tiny),
                                                                     epochs=4))
    after = open_model(result.last_checkpoint).model.state_dict()
    assert not torch.equal(before["features.0.weight"], after["features.0.weight"])
    assert not torch.equal(before["features.1.running_mean"], after["features.1.running_mean"])
    assert result.best_val_acc >= 0.75  # red vs blue is easy


def test_run_folder_contents(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = train(dataset, out=out, config=tiny_config(epochs=2))
    for name in ("best.safetensors", "best.json", "last.safetensors", "last.json", "metrics.csv",
                 "summary.json", "predictions.png", "curves.png"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert {"train_loss", "val_loss", "val_acc", "epoch_time", "step_time", "images_per_s", "data_wait"} <= set(rows[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["best_val_acc"] == result.best_val_acc
    assert summary["classes"] == ["blue", "red"]
    meta = json.loads((out / "best.json").read_text())
    assert meta["arch"] == "tiny" and meta["classes"] == ["blue", "red"]
    assert meta["preprocessing"]["image_size"] == 32
    assert meta["config"]["strategy"] == "finetune" and meta["epoch"] == result.best_epoch
    assert "torch" in meta["versions"]


def test_checkpoint_round_trip_gives_identical_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = create_model("tiny", num_classes=3).eval()
    pre = Preprocessing(image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    save_checkpoint(tmp_path / "ck", m, classes=["a", "b", "c"], preprocessing=pre, epoch=1)
    ck = open_model(tmp_path / "ck.safetensors")
    assert ck.classes == ["a", "b", "c"] and ck.preprocessing == pre
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), ck.model(x))


def test_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        open_model(tmp_path / "missing.safetensors")
    from headstart.io.weights import LoadedWeights, save_weights

    save_weights(tmp_path / "plain.safetensors", LoadedWeights(create_model("tiny").state_dict()))
    with pytest.raises(ValueError, match="not a headstart checkpoint"):
        read_checkpoint(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match="do not fit resnet50"):  # plain weights are taken for resnet50's...
        open_model(tmp_path / "plain.safetensors")
    assert open_model(tmp_path / "plain.safetensors", arch="tiny").classes[:2] == ["class_0", "class_1"]
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    for reader in (read_checkpoint, open_model):
        with pytest.raises(ValueError, match="not a valid safetensors"):
            reader(tmp_path / "junk.safetensors")


def test_a_corrupt_file_is_skipped_and_named_once(dataset: Path, tmp_path: Path, caplog) -> None:
    bad = dataset / "train" / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with caplog.at_level("WARNING", logger="headstart"):
        result = train(dataset, out=tmp_path / "run", config=tiny_config(epochs=2))
    assert list(result.skipped) == [str(bad)]
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_files"] == {str(bad): result.skipped[str(bad)]}


def test_metrics() -> None:
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    m = compute_metrics(logits, labels, ["a", "b"])
    assert m.confusion == [[2, 1], [1, 1]]
    assert m.accuracy == pytest.approx(3 / 5)
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m.per_class[0].precision == pytest.approx(2 / 3) and m.per_class[1].recall == pytest.approx(1 / 2)


def test_evaluate_and_predict_use_the_checkpoint(dataset: Path, tmp_path: Path) -> None:
    result = train(dataset, out=tmp_path / "run", config=tiny_config(epochs=3))
    m = evaluate(result.best_checkpoint, dataset, workers=0)
    assert m.n == 12 and m.accuracy == pytest.approx(result.best_val_acc)
    # Predict on a folder (recursive), with a file that is not an image among them.
    folder = tmp_path / "incoming"
    (folder / "sub").mkdir(parents=True)
    colour_image((220, 40, 30), seed=99).save(folder / "a.png")
    colour_image((30, 40, 220), seed=98).save(folder / "sub" / "b.jpg")
    (folder / "sub" / "c.jpg").write_text("not an image")
    preds = predict(result.best_checkpoint, [folder], top_k=2, workers=0)
    assert [Path(p.path).name for p in preds] == ["a.png", "b.jpg", "c.jpg"]
    assert preds[0].label in ("blue", "red") and len(preds[0].top_k) == 2
    assert sum(q for _, q in preds[0].top_k) == pytest.approx(1.0, abs=1e-4)
    assert preds[2].label is None and "not a readable image" in preds[2].error


def test_bad_config_values_name_the_choices() -> None:
    with pytest.raises(ValueError, match="finetune"):
        TrainConfig(strategy="half")
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)
    assert TrainConfig(strategy="frozen").momentum == 0.5
    assert TrainConfig(strategy="finetune").momentum == 0.9


class _Messages(Callback):
    def __init__(self) -> None:
        self.messages: list[str] = []

    def on_message(self, text: str) -> None:
        self.messages.append(text)


@pytest.mark.slow
def test_frozen_features_are_cached_on_disk_and_reused(dataset: Path, tmp_path: Path, pretrained_tiny: Path) -> None:
    config = tiny_config(strategy="frozen", weights=str(pretrained_tiny), epochs=3, views=2)
    first, second = _Messages(), _Messages()
    a = train(dataset, out=tmp_path / "a", config=config, callback=first)
    b = train(dataset, out=tmp_path / "b", config=config, callback=second)
    assert "from the disk cache" not in first.messages[0] and "from the disk cache" in second.messages[0]
    assert "84 images" in first.messages[0]  # 24 train x (1 + 2 views) + 12 val
    assert [r.train_loss for r in a.history] == [r.train_loss for r in b.history]
    # Another file content means other features: the cache is keyed by content.
    colour_image((0, 255, 0), seed=7).save(dataset / "train" / "red" / "red_0.png")
    third = _Messages()
    train(dataset, out=tmp_path / "c", config=config, callback=third)
    assert "from the disk cache" not in third.messages[0]
    # Other numerics mean other features: the cache is keyed by precision and engine too.
    auto = resolve_runtime()  # (features: in OpenVINO whatever their number, where it is auto's engine)
    other_precision = "bf16" if auto.precision == "fp32" else "fp32"
    other_engine = "torch" if auto.engine == "openvino" else "openvino"
    for n, other in enumerate([{"precision": other_precision}, {"engine": other_engine}]):
        messages = _Messages()
        train(dataset, out=tmp_path / f"d{n}", config=tiny_config(**{**asdict(config), **other}), callback=messages)
        assert "from the disk cache" not in messages.messages[0], other


@pytest.mark.parametrize("strategy", ["finetune", "frozen"])
def test_same_seed_same_weights_whatever_the_worker_count(dataset: Path, tmp_path: Path, strategy: str) -> None:
    runs = []
    for workers in (0, 2, 0):
        gc.disable()  # (the workers must be gone when train returns, not when a collection finds their loader)
        try:
            res = train(dataset, out=tmp_path / f"w{workers}-{len(runs)}",
                        config=tiny_config(strategy=strategy, workers=workers, epochs=2, feature_cache="memory"))
            # The loaders' workers end with the run: none wait for a garbage collection to shut them down
            # (which waited 5 s a worker, 20 s of a 60 s hymenoptera run).
            assert multiprocessing.active_children() == []
        finally:
            gc.enable()
        runs.append(open_model(res.last_checkpoint).model.state_dict())
    for other in runs[1:]:
        assert all(torch.equal(runs[0][k], other[k]) for k in runs[0])


def test_balance_weights_the_loss_by_inverse_class_frequency(tmp_path: Path) -> None:
    from headstart.data import scan_dataset
    from headstart.training.optim import class_weights

    from .conftest import make_dataset

    root = make_dataset(tmp_path / "d", per_class={"train": 3, "val": 2})
    for i in range(9):  # red: 3 + 9 = 12 training images, blue: 3
        colour_image((220, 40, 30), seed=100 + i).save(root / "train" / "red" / f"extra_{i}.png")
    w = class_weights(scan_dataset(root))
    assert w.tolist() == pytest.approx([15 / (2 * 3), 15 / (2 * 12)])  # blue is rarer, weighs 4x more
    plain = train(root, out=tmp_path / "a", config=tiny_config(epochs=2))
    balanced = train(root, out=tmp_path / "b", config=tiny_config(epochs=2, balance=True))
    assert plain.history[0].train_loss != balanced.history[0].train_loss
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["config"]["balance"] is True


class _NormAndHead(FineTune):
    """A strategy written outside headstart: only the BatchNorm affine parameters and the head
    train (the backbone's BatchNorm statistics still move: the network runs in train mode)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        norms = [p for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
        return norms + list(self.head.parameters())


@pytest.fixture
def norm_strategy():
    info = register_strategy(StrategyInfo("norm-and-head", _NormAndHead, momentum=0.9,
                                          description="train BatchNorm's scale and shift, and the head"))
    yield info
    del STRATEGIES[info.name]


def test_a_strategy_with_the_old_checkpoint_hooks_is_refused_with_what_replaces_them(dataset: Path,
                                                                                     tmp_path: Path) -> None:
    """A strategy written for the old protocol (on_best, save, finish wrote the checkpoints) would have
    its hooks skipped by the loop that now writes them: it is refused, and told what replaces them."""
    class OldHooks(FineTune):
        def on_best(self, checkpoints, meta) -> None:
            checkpoints.write("best", **meta)

    register_strategy(StrategyInfo("old-hooks", OldHooks, momentum=0.9, description="the old protocol"))
    try:
        with pytest.raises(TypeError, match=r"'old-hooks' \(OldHooks\) defines on_best: the loop writes every "
                                            r"checkpoint now .* best_tensors\(epoch\)"):
            train(dataset, out=tmp_path / "run", config=TrainConfig(arch="tiny", weights=None, strategy="old-hooks",
                                                                   epochs=1, batch_size=8, workers=0))
    finally:
        del STRATEGIES["old-hooks"]
    assert not (tmp_path / "run" / "best.safetensors").exists()


def test_a_new_strategy_is_a_class_and_one_registration(norm_strategy, dataset: Path, tmp_path: Path,
                                                         pretrained_tiny: Path, capsys) -> None:
    from headstart.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "norm-and-head: train BatchNorm's scale and shift, and the head" in " ".join(capsys.readouterr().out.split())
    before = torch.load(pretrained_tiny, weights_only=True)
    assert main(["train", str(dataset), "--arch", "tiny", "--weights", str(pretrained_tiny), "--strategy",
                 "norm-and-head", "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--workers", "0",
                 "--out", str(tmp_path / "run")]) == 0
    after = open_model(tmp_path / "run" / "last").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])} - {"fc.weight", "fc.bias"}
    assert changed == {f"features.{i}.{name}" for i in (1, 4)
                       for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["config"]["strategy"] == "norm-and-head"
