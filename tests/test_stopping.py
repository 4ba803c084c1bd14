"""A run that ends when the model is done: early stopping (a callback), progressive resizing,
the learning-rate warm-up (issue 27)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from headstart.cli import main
from headstart.io.runstate import EpochRecord
from headstart.training import TrainConfig, callbacks, resume, train
from headstart.training.callbacks import EarlyStopping, Run, accuracy_noise, last_improvement

from .conftest import make_dataset
from .test_resume import _wait_for, epochs_done, same, start_cli, weights


def record(epoch: int, acc: float, loss: float) -> EpochRecord:
    return EpochRecord(epoch, 10, 0.0, 0.0, loss, acc, acc, 1.0, 0.1, 10.0, 0.0, 0.001)


def stopped(history: list[EpochRecord], patience: int, images: int = 153) -> str | None:
    run = Run(None, None, types.SimpleNamespace(val=[0] * images), history, 10, 0.0)
    EarlyStopping(patience).on_validation_end(run)
    return run.stopped


def test_progress_is_a_lower_loss_or_an_accuracy_above_its_noise() -> None:
    assert accuracy_noise(0.95, 153) == pytest.approx(0.0176, abs=1e-4)  # 2.7 images of 153
    assert accuracy_noise(1.0, 153) == 1 / 153  # never less than one image
    h = [record(0, 0.9412, 0.121), record(1, 0.9477, 0.125)]  # one image more, a higher loss: noise
    assert last_improvement(h, 153) == 0
    h.append(record(2, 0.9477, 0.117))  # a loss 3% lower: progress
    assert last_improvement(h, 153) == 2
    h.append(record(3, 0.9673, 0.119))  # three images more than the best: progress
    assert last_improvement(h, 153) == 3
    h.append(record(4, 0.9608, 0.1175))  # neither (the loss is not 2% under 0.117)
    assert last_improvement(h, 153) == 3


def test_early_stopping_waits_patience_epochs_after_the_last_progress() -> None:
    h = [record(0, 0.975, 0.082), record(1, 0.933, 0.409)]
    assert stopped(h, 2) is None  # one epoch without progress: patience 2 waits
    h.append(record(2, 0.9625, 0.159))
    reason = stopped(h, 2)
    assert reason.startswith("validation has not improved on the head fitted on the features (epoch 0) for 2 "
                             "epoch(s)") and "153 images" in reason
    assert stopped(h, 3) is None
    h = [record(1, 0.90, 0.30), record(2, 0.93, 0.20), record(3, 0.93, 0.21), record(4, 0.92, 0.22)]
    assert "on epoch 2 for 2 epoch(s)" in stopped(h, 2)
    last = [record(e, 0.9, 0.3) for e in range(1, 11)]
    assert stopped(last, 2) is None  # the last epoch: nothing left to stop


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(arch="tiny", weights=None, strategy="finetune", epochs=8, batch_size=8, lr=0.05,
                                 workers=0), **kw})


def test_patience_stops_a_run_and_off_trains_every_epoch(tmp_path: Path, capsys) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 16, "val": 6})
    # an lr this low changes nothing a validation split can see: patience 1 stops after the first such epoch
    quiet = dict(strategy="finetune", lr=1e-7, epochs=6)
    run = train(data, out=tmp_path / "a", config=tiny(patience=1, **quiet))
    assert [r.epoch for r in run.history] == [1, 2] and "validation has not improved on epoch 1" in run.stopped
    # its likely estimate is that stop: patience 1 after epoch 1, the first validated (no epoch 0 here)
    assert (run.estimate.likely_epochs, run.estimate.epochs) == (2, 6) and run.estimate.likely_s < run.estimate.total_s
    full = train(data, out=tmp_path / "b", config=tiny(patience=0, **quiet))
    assert [r.epoch for r in full.history] == list(range(1, 7)) and full.stopped is None
    assert main(["train", str(data), "--out", str(tmp_path / "c"), "--arch", "tiny", "--weights", "none",
                 "--strategy", "finetune", "--lr", "1e-7", "--epochs", "6", "--patience", "1", "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "stopping after epoch 2: validation has not improved on epoch 1 for 1 epoch(s)" in out
    assert "stopped: validation has not improved" in out  # the closing line says why
    with pytest.raises(ValueError, match="patience 'soon' is not a number of epochs"):
        tiny(patience="soon")


@pytest.mark.slow
def test_early_stopping_resumes_bit_identically_after_a_kill(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", per_class={"train": 24, "val": 6})
    flags = dict(lr=1e-7, epochs=12, patience=3)  # nothing a split can see changes: stops after epoch 4
    ref = train(data, out=tmp_path / "ref", config=tiny(**flags))
    assert ref.stopped and 3 <= ref.history[-1].epoch < 12, [(r.epoch, r.val_acc, r.val_loss) for r in ref.history]
    run = tmp_path / "run"
    args = ["train", str(data), "--arch", "tiny", "--weights", "none", "--strategy", "finetune", "--epochs", "12",
            "--batch-size", "8", "--lr", "1e-7", "--patience", "3", "--workers", "0", "--out", str(run)]
    p = start_cli(args, slow_fsync=0.05)
    assert _wait_for(lambda: epochs_done(run) >= 2 or p.poll() is not None)
    p.kill()
    p.wait()
    assert 2 <= epochs_done(run) < ref.history[-1].epoch, "killed before the run stopped"
    resumed = resume(run)
    assert resumed.stopped == ref.stopped and resumed.history[-1].epoch == ref.history[-1].epoch
    assert same(weights(tmp_path / "ref"), weights(run))
    again = resume(run)  # a stopped run resumed: it stays stopped, nothing more trains
    assert again.history[-1].epoch == ref.history[-1].epoch and same(weights(tmp_path / "ref"), weights(run))


def test_each_epoch_trains_at_its_size(tmp_path: Path, monkeypatch) -> None:
    """--train-sizes 16,24: epoch 1 at 16 pixels, epoch 2 at 24, then --image-size (32); validation at 32."""
    from headstart.runtime import device as rt
    from headstart.training import strategies

    data = make_dataset(tmp_path / "data", per_class={"train": 16, "val": 6})
    seen: list[tuple[bool, int]] = []  # (a training batch, its side)
    validating = [False]
    real_inputs, real_validate = rt.Runtime.inputs, strategies.Strategy._validate_images

    def inputs(self, images, pre):
        seen.append((not validating[0], images.shape[-1]))
        return real_inputs(self, images, pre)

    def validate(self, epoch):
        validating[0] = True
        try:
            return real_validate(self, epoch)
        finally:
            validating[0] = False

    monkeypatch.setattr(rt.Runtime, "inputs", inputs)
    monkeypatch.setattr(strategies.Strategy, "_validate_images", validate)

    class Epochs(callbacks.Callback):
        def __init__(self) -> None:
            self.marks: list[int] = []

        def on_epoch_end(self, record) -> None:
            self.marks.append(len(seen))

    epochs = Epochs()
    train(data, out=tmp_path / "run", config=tiny(epochs=4, train_sizes=(16, 24), patience=0, engine="torch"),
          callback=epochs)
    per_epoch = [seen[a:b] for a, b in zip([0, *epochs.marks], epochs.marks)]
    trained = [{size for grad, size in batches if grad} for batches in per_epoch]
    validated = [{size for grad, size in batches if not grad} for batches in per_epoch]
    assert trained == [{16}, {24}, {32}, {32}] and validated == [{32}] * 4
    with pytest.raises(ValueError, match="train sizes '16,x' are not crop sizes"):
        tiny(train_sizes="16,x")


def test_the_warm_up_raises_the_learning_rate_from_a_hundredth() -> None:
    from headstart.runtime.device import resolve_runtime
    from headstart.training.optim import Stepper

    p = torch.nn.Parameter(torch.zeros(1))
    s = Stepper.build([p], TrainConfig(lr=0.01, warmup=1, schedule="cosine"), 40, resolve_runtime(device="cpu"),
                      steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(s.lr)
        s.step((p * 0).sum())
    assert lrs[0] == pytest.approx(1e-4) and lrs[5] == pytest.approx(0.01 * (0.01 + 0.99 * 0.5))
    assert lrs[10] == pytest.approx(0.01) and lrs[-1] < 0.001 and lrs == sorted(lrs[:11]) + lrs[11:]
