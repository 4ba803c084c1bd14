"""partial, gradual and auto; stages; the convex head fit; the estimate and the budget (tiny model,
generated data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from headstart.analysis.linear import fit_head
from headstart.io.runstate import read_run_state
from headstart.models import create_model, get_model_info, list_models, meta_model, open_model, stage_names
from headstart.models.stages import run_stages, stage_flops
from headstart.runtime.clock import parse_duration
from headstart.training import TrainConfig, train
from headstart.training.strategies import Candidate, choose_plan

from .conftest import make_dataset, needs_nncf


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**dict(arch="tiny", weights=None, epochs=3, batch_size=8, lr=0.05, workers=0), **kw})


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "data", per_class={"train": 16, "val": 6})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return open_model(path).model.state_dict()


@pytest.mark.parametrize("name", list_models())
def test_stages_cover_the_backbone_and_compose_to_its_features(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=3).eval()
    stages = model.stages()
    assert [s.name for s in stages] == stage_names(name) and len(set(stage_names(name))) == len(stages)
    head = {id(p) for p in model.get_submodule(get_model_info(name).classifier).parameters()}
    owned = [id(p) for s in stages for m in s.modules for p in m.parameters()]
    assert len(owned) == len(set(owned))  # no parameter in two stages
    assert set(owned) | head == {id(p) for p in model.parameters()}  # and none outside stages and head
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), model.forward_head(model.pool(run_stages(stages, x))))


def test_stage_flops_add_up_to_resnet50s_8_2_gflop() -> None:
    flops = stage_flops(meta_model("resnet50"), 224)
    assert sum(flops) / 1e9 == pytest.approx(8.2, abs=0.05)
    assert [round(f / 1e9, 1) for f in flops] == [0.2, 1.3, 2.1, 2.9, 1.6]


def test_partial_trains_from_its_stage_and_keeps_the_rest_bit_identical(data: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    start = create_model("tiny", num_classes=10)
    torch.save(start.state_dict(), tmp_path / "w.pth")
    run = train(data, out=tmp_path / "run", config=tiny(strategy="partial", train_from="block2",
                                                           weights=str(tmp_path / "w.pth")))
    after = weights(run.last_checkpoint)
    before = start.state_dict()
    changed = {k.split(".")[0] + "." + k.split(".")[1] if k.startswith("features") else k.split(".")[0]
               for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed == {"features.3", "features.4", "fc"}  # block2's conv and BatchNorm, and the new head
    with pytest.raises(ValueError, match="'layer9' is not a stage of tiny: choose one of block1, block2"):
        train(data, out=tmp_path / "bad", config=tiny(strategy="partial", train_from="layer9"))


def test_gradual_starts_from_the_head_fitted_on_the_features(data: Path, tmp_path: Path) -> None:
    run = train(data, out=tmp_path / "run", config=tiny(strategy="gradual", backbone_lr=0.25))
    assert [r.epoch for r in run.history] == [0, 1, 2, 3]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[1].startswith("0,3,")  # epoch 0 is in metrics.csv too
    groups = read_run_state(tmp_path / "run" / "state.safetensors", tensors=False).meta["optimizer_param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([0.05, 0.0125])  # head, then backbone at 0.25 x
    assert [len(g["params"]) for g in groups] == [2, 3]  # fc.weight, fc.bias; the last stage: conv, BatchNorm (2)


def test_the_convex_head_fit_reaches_the_optimum_and_keeps_views_together() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=g)
    y = (x[:, 0] + 0.5 * torch.randn(60, generator=g) > 0).long()
    fit = fit_head(x, y, 2, l2_grid=(0.1,))
    # The penalised loss is at its minimum: its gradient is zero at the fitted head (in the
    # standardised space the penalty is defined in).
    mu, sigma = x.double().mean(0), x.double().std(0)
    W = (fit.weight.double() * sigma).requires_grad_()
    b = (fit.bias.double() + fit.weight.double() @ mu).requires_grad_()
    loss = F.cross_entropy(((x.double() - mu) / sigma) @ W.T + b, y) + 0.05 * (W * W).sum()
    grads = torch.autograd.grad(loss, [W, b])
    assert max(float(t.abs().max()) for t in grads) < 1e-5
    # Cross-validation picks from the grid, the same way each time; a group's rows share a fold.
    groups = torch.arange(60) // 3  # twenty "images" of three views each
    a = fit_head(x, y, 2, groups=groups, seed=1)
    assert a.l2 in a.cv_loss and a.l2 == min(a.cv_loss, key=lambda k: (a.cv_loss[k], -k))
    from headstart.analysis import linear

    linear._REMEMBERED.clear()  # solved again, not read back (the next test shows the reading back)
    assert torch.equal(a.weight, fit_head(x, y, 2, groups=groups, seed=1).weight)
    from headstart.analysis.linear import fold_of_each_row
    folds = fold_of_each_row(y, groups, 5, seed=1)
    assert all(len(set(folds[groups == k].tolist())) == 1 for k in range(20))


def test_a_fit_asked_for_again_is_read_back_and_other_inputs_are_solved(monkeypatch) -> None:
    """A run's label check asks for the fit its epoch 0 made: the same inputs (groups None is a group
    per row) give the same head without an L-BFGS solve, as a copy; any other input is solved."""
    from headstart.analysis import labels, linear

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(45, 6, generator=g), torch.arange(45) % 3
    solves = []
    real = linear.solve_head

    def counted(*a, **k):
        solves.append(1)
        return real(*a, **k)

    monkeypatch.setattr(linear, "solve_head", counted)
    monkeypatch.setattr(labels, "solve_head", counted)  # (its per-fold solves)
    first = fit_head(x, y, 3, seed=7)
    n = len(solves)
    assert n == 26  # 5 folds x 5 penalties, then all rows
    again = fit_head(x, y, 3, groups=torch.arange(45), seed=7)
    assert len(solves) == n and torch.equal(again.weight, first.weight) and again.l2 == first.l2
    again.weight += 1  # a copy: what is kept stays as it was
    assert torch.equal(fit_head(x, y, 3, seed=7).weight, first.weight) and len(solves) == n
    changed = x.clone()
    changed[0, 0] += 1e-3
    for other in (dict(features=x, seed=8), dict(features=changed, seed=7)):
        before = len(solves)
        fit_head(other["features"], y, 3, seed=other["seed"])
        assert len(solves) == before + 26
    before = len(solves)
    probs = labels.out_of_fold_probabilities(x, y, 3, seed=7)  # the fit above chose its penalty: 5 fold solves
    assert len(solves) == before + 5
    assert torch.equal(labels.out_of_fold_probabilities(x, y, 3, seed=7), probs) and len(solves) == before + 5


def test_choose_plan_trains_less_of_the_network_as_the_budget_shrinks() -> None:
    candidates = [Candidate("layer4", 0.5, 10.0), Candidate("layer3", 1.0, 20.0), Candidate("stem", 2.0, 40.0)]
    plans = [choose_plan(candidates, seconds_left=s, epochs=10)[:2] for s in (1000, 200, 100, 50, 20)]
    assert plans == [("stem", 10), ("stem", 5), ("layer3", 5), ("layer4", 5), ("layer4", 0)]


@pytest.mark.slow
def test_auto_plans_for_the_budget_and_keeps_to_it(data: Path, tmp_path: Path) -> None:
    roomy = train(data, out=tmp_path / "roomy", config=tiny(strategy="auto", budget="1h"))
    summary = json.loads((tmp_path / "roomy" / "summary.json").read_text())
    plan = summary["plan"]
    assert plan["train_from"] == "block1" and plan["epochs"] == 3  # everything, for every epoch asked for
    assert [c["train_from"] for c in plan["candidates"]] == ["block2", "block1"]
    assert all(c["step_seconds"] > 0 for c in plan["candidates"])
    # The same seed and plan give the same weights.
    again = train(data, out=tmp_path / "again", config=tiny(strategy="auto", budget="1h"))
    a, b = weights(roomy.last_checkpoint), weights(again.last_checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A budget spent before the plan is made: the head fitted on the features is the result.
    tight = train(data, out=tmp_path / "tight", config=tiny(strategy="auto", budget=0.01))
    assert [r.epoch for r in tight.history] == [0] and tight.best_epoch == 0
    assert json.loads((tmp_path / "tight" / "summary.json").read_text())["plan"]["epochs"] == 0
    assert (tmp_path / "tight" / "best.safetensors").is_file()


def test_an_epoch_starts_only_if_it_ends_within_the_budget(monkeypatch) -> None:
    """So a run overshoots its budget only by what its last epoch takes beyond the one before."""
    import types

    import headstart.training.callbacks as callbacks
    from headstart.io.runstate import EpochRecord

    now = [0.0]
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def record(epoch: int, seconds: float) -> EpochRecord:
        return EpochRecord(epoch, 10, 0, 0, 0, 0, 0, seconds, 0, 0, 0, 0.001)

    def stops(history: list[EpochRecord]) -> str | None:
        run = callbacks.Run(None, None, types.SimpleNamespace(val=[0] * 10), history, 10, 0.0)
        callbacks.StopAtBudget(100.0).on_validation_end(run)
        return run.stopped

    assert stops([record(0, 80.0)]) is None  # epoch 0 (features, the head) is no training epoch
    now[0] = 60.0
    assert stops([record(0, 5.0), record(1, 30.0)]) is None  # 60 + 30 <= 100
    now[0] = 75.0
    assert stops([record(0, 5.0), record(1, 30.0)]) == ("another epoch (about 30.0 s) would end after the budget of "
                                                        "1.7 min, 75.0 s spent")


def test_a_budget_stops_any_strategy_before_an_epoch_that_would_not_fit(data: Path, tmp_path: Path) -> None:
    run = train(data, out=tmp_path / "run", config=tiny(strategy="finetune", epochs=50, budget=1e-3))
    assert [r.epoch for r in run.history] == [1]  # the first epoch runs; the next one would not fit
    assert parse_duration("1h30m") == 5400 and parse_duration("90s") == parse_duration("1.5m") == 90
    for bad in ("soon", "5 minutes", "-3", "0"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_the_estimate_is_said_and_kept(data: Path, tmp_path: Path) -> None:
    class Messages:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def on_message(self, text: str) -> None:
            self.lines.append(text)

        def __getattr__(self, name: str):
            return lambda *a, **k: None

    said = Messages()
    run = train(data, out=tmp_path / "run", config=tiny(epochs=2, batch_size=4), callback=said)
    est = json.loads((tmp_path / "run" / "summary.json").read_text())["estimate"]
    assert est == {**est, "epochs": 2, "steps_per_epoch": 8, "measured_steps": 5}
    assert est["total_s"] >= est["spent_s"] > 0 and est["step_s"] > 0
    assert [line for line in said.lines if line.startswith("estimated ")] == [run.estimate.line()]
    assert "2 epochs x 8 steps at" in run.estimate.line()


def test_the_estimate_skips_the_warm_up_steps_and_takes_the_median(monkeypatch) -> None:
    """Steps of 9, 6, 2, 2, 9 (a stall), 2, 2 s: the estimate's step is 2 s, the median of steps 3-7."""
    import headstart.runtime.clock as clock_module
    from headstart.runtime.clock import Clock

    class Plan:
        epochs, steps_per_epoch = 3, 10

        def validation_seconds(self, step_s: float) -> float:
            return 1.0

    now = [100.0]
    monkeypatch.setattr(clock_module.time, "perf_counter", lambda: now[0])
    clock = Clock(type("Quiet", (), {"__getattr__": lambda self, name: lambda *a, **k: None})(), started=90.0)
    clock.watch(Plan())
    for step, seconds in enumerate([9, 6, 2, 2, 9, 2, 2], start=1):
        assert clock.estimate is None
        now[0] += seconds
        clock.on_step("train", 1, step, 10, 0.5)
    est = clock.estimate
    assert est is not None and (est.step_s, est.measured_steps) == (2.0, 5)
    # 42 s spent; 3 steps of epoch 1 and 20 of epochs 2-3 left at 2 s; 3 validations of 1 s
    assert est.spent_s == 42.0 and est.total_s == 42.0 + 23 * 2.0 + 3 * 1.0
    assert est.likely_s == est.total_s and "at most" not in est.line()  # no early stopping: every epoch
    # With --patience 2 and an epoch 0 (the head fitted on the features) the likely run stops after epoch 2:
    # 3 steps of epoch 1 and 10 of epoch 2, 2 validations; both estimates add the calibration's backbone pass
    # after the last epoch (5 s here). Without an epoch 0 the first chance to stop is after epoch 3: every epoch.
    class Calibrated(Plan):
        def finish_seconds(self, step_s: float) -> float:
            return 5.0

    estimates = {}
    for first_epoch in (0, 1):
        now[0] = 100.0
        clock = Clock(type("Quiet", (), {"__getattr__": lambda self, name: lambda *a, **k: None})(), started=90.0)
        clock.watch(Calibrated(), patience=2, first_epoch=first_epoch)
        for step, seconds in enumerate([9, 6, 2, 2, 9, 2, 2], start=1):
            now[0] += seconds
            clock.on_step("train", 1, step, 10, 0.5)
        estimates[first_epoch] = clock.estimate
    assert estimates[1].likely_epochs == 3 and estimates[1].likely_s == estimates[1].total_s
    est = estimates[0]
    assert est.total_s == 42.0 + 23 * 2.0 + 3 * 1.0 + 5.0 and est.likely_s == 42.0 + 13 * 2.0 + 2 * 1.0 + 5.0
    assert est.likely_epochs == 2 and "likely (stopping after epoch 2: --patience 2" in est.line()


def test_train_size_trains_smaller_crops_and_predicts_at_the_image_size(data: Path, tmp_path: Path) -> None:
    run = train(data, out=tmp_path / "run", config=tiny(epochs=1, image_size=40, train_size=24))
    ckpt = open_model(run.best_checkpoint)
    assert ckpt.preprocessing.image_size == 40 and ckpt.preprocessing.train_size == 24
    from headstart.data import scan_dataset

    sample = scan_dataset(data).train[0]
    from PIL import Image

    with Image.open(sample.path) as img:
        assert ckpt.preprocessing.train_transform()(img).shape == (3, 24, 24)
        assert ckpt.preprocessing.eval_transform()(img).shape == (3, 40, 40)


def test_precision_int8_computes_the_frozen_features_with_a_quantized_backbone(data: Path, tmp_path: Path) -> None:
    needs_nncf()
    from headstart.runtime.device import resolve_runtime
    from headstart.runtime.features import extract_features

    fp32 = train(data, out=tmp_path / "fp32", config=tiny(strategy="frozen", precision="fp32", epochs=2))
    int8 = train(data, out=tmp_path / "int8", config=tiny(strategy="frozen", precision="int8", epochs=2))
    summary = json.loads((tmp_path / "int8" / "summary.json").read_text())
    assert summary["runtime"].endswith(", int8 features (NNCF)") and summary["config"]["precision"] == "int8"
    assert abs(int8.best_val_acc - fp32.best_val_acc) <= 0.25  # 12 validation images: 3 of them at most
    # The features themselves: an int8 copy's, near the fp32 ones but not the same numbers
    from headstart.data import scan_dataset
    from headstart.models import open_model
    from headstart.runtime.features import calibration_inputs

    model = open_model(fp32.best_checkpoint)
    splits = scan_dataset(data)
    rt32, rt8 = resolve_runtime(precision="fp32", engine="openvino"), resolve_runtime(precision="int8")
    a = extract_features(model.model, splits.val, runtime=rt32, pre=model.preprocessing)
    q = rt8.inference_model(model.model, features=True, calibration=lambda: calibration_inputs(
        splits.train, runtime=rt8, pre=model.preprocessing))
    b = extract_features(model.model, splits.val, runtime=rt8, pre=model.preprocessing, backbone=lambda: q)
    diff = (a.features - b.features).abs().max().item()
    assert 0 < diff < 0.5 * a.features.abs().max().item()


def test_precision_int8_is_refused_where_nothing_is_frozen() -> None:
    for strategy, cache in (("finetune", "disk"), ("partial", "disk"), ("frozen", "off")):
        with pytest.raises(ValueError, match="precision int8 is for the frozen backbone's cached features"):
            tiny(strategy=strategy, feature_cache=cache, precision="int8")
    with pytest.raises(ValueError, match="precision int8 runs in OpenVINO on the CPU"):
        from headstart.runtime.device import resolve_runtime

        resolve_runtime(precision="int8", engine="torch")
