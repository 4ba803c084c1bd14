"""The whole run, the one call behind `headstart train`: dataset -> model -> loop.fit -> the run
folder's files (report/run.py: pictures, summary.json, report.html); and `resume`."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from headstart.analysis import confidence
from headstart.analysis.files import unreadable_files
from headstart.analysis.limits import fit_limits
from headstart.data import DatasetSplits, scan_dataset
from headstart.io.checkpoint import add_to_checkpoint
from headstart.io.download import writable_cache
from headstart.io.runfolder import check_dataset_unchanged, claim_run_folder, write_dataset_listing, write_summary
from headstart.io.runstate import STATE_FILE, RunState, read_run_state
from headstart.models import create_model, get_model_info
from headstart.report.run import write_run_files
from headstart.runtime.clock import parse_duration
from headstart.runtime.device import resolve_runtime
from headstart.runtime.distributed import SINGLE, Group, join
from headstart.runtime.inference import infer
from headstart.training.callbacks import Callback
from headstart.training.config import TrainConfig
from headstart.training.interrupts import TrainingInterrupted
from headstart.training.loop import RunResult, fit, stopping_callbacks
from headstart.training.registry import get_strategy
from headstart.training.strategies import choose_backbone

log = logging.getLogger(__name__)


def train(data: str | os.PathLike[str], *, out: str | os.PathLike[str], config: TrainConfig | None = None,
          callback: Callback | None = None, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Train a classifier on a class-per-folder dataset; everything goes into `out` (see
    io/runfolder.py): best/last checkpoints (.safetensors + .json), metrics.csv, summary.json, the
    pictures, report.html, and state.safetensors (what `resume=True` continues from). A folder
    that holds another run is refused unless `overwrite`; see runfolder.claim_run_folder.
    """
    started = time.perf_counter()
    config = config or TrainConfig()
    writable_cache()  # the features, graphs and kernels go there: a folder that cannot take them is said now
    group = join(timeout=config.timeout, device=config.device)  # one process alone, or a rank of torchrun's
    out = group.broadcast(out)  # rank 0's (a default folder is chosen by what exists when each rank looks)
    held = claim_run_folder(Path(out), data=data, resume=resume, overwrite=overwrite) if group.main else \
        contextlib.nullcontext()
    with held:
        result = _train(data, Path(out), config, callback or Callback(), resume, started, group)
    group.leave()  # (rank 0 still writes its files alone when the others leave: no collective is waited for)
    return result


def _train(data: str | os.PathLike[str], out: Path, config: TrainConfig, callback: Callback, resume: bool,
           started: float, group: Group) -> RunResult:
    splits = scan_dataset(data, val_split=config.val_split, seed=config.seed, columns=config.columns())
    if resume and group.main:
        check_dataset_unchanged(out, splits)
    elif group.main:
        write_dataset_listing(out, splits)
    bad = _drop_unreadable(splits, fail=config.bad_files == "fail")
    if group.active:  # every rank must read the same images in the same order
        seen = group.gather((splits.classes, [str(s.path) for s in splits.train], [str(s.path) for s in splits.val]))
        if any(other != seen[0] for other in seen[1:]):
            differ = [r for r, other in enumerate(seen) if other != seen[0]]
            raise ValueError(f"rank(s) {differ} see other files in {data} than rank 0 (classes, or the readable "
                             "images of a split): every rank needs the same dataset at the same path")
    strategy = get_strategy(config.strategy)
    runtime = resolve_runtime(device=config.device, precision=config.precision, threads=config.threads,
                              compile=config.compile and strategy.compiles, engine=config.engine, group=group)
    chose_arch: dict[str, Any] = {}
    if config.arch == "auto":  # the backbone whose features a head fits best; the run then reads them back
        arch, scores = choose_backbone(splits, config=config, runtime=runtime, callback=callback)
        config, chose_arch = replace(config, arch=arch), {"backbone_choice": scores}
    info = get_model_info(config.arch)
    pre = info.preprocessing.with_sizes(config.image_size, config.train_size)
    if resume and strategy.holds_weights:  # every weight comes from the run state
        arch_kwargs = group.broadcast(read_run_state(out / STATE_FILE, tensors=False).meta.get("arch_kwargs", {})
                                      if group.main else None)
        model = create_model(config.arch, num_classes=len(splits.classes), **arch_kwargs)
    else:
        torch.manual_seed(config.seed)  # the new head's initialisation
        model = create_model(config.arch, num_classes=len(splits.classes), weights=config.weights)
    counts = splits.counts()
    callback.on_start({"classes": splits.classes, "counts": counts, "runtime": runtime.describe(),
                       "config": asdict(config), "out": str(out)})
    result = fit(model, splits, config=config, preprocessing=pre, runtime=runtime, out=out, callback=callback,
                 callbacks=stopping_callbacks(config), resume=resume,
                 run_meta={"data": str(Path(data).resolve()), "arch_kwargs": model.arch_kwargs},
                 skipped=bad, started=started)
    result.training_time = time.perf_counter() - started  # (to the last epoch's end; the run's files follow)
    if not group.main:  # rank 0 writes the run's files
        return result
    # The best model on the validation set (computed again after a resume): pictures, summary, report.
    inf = result.val_inference or infer(model, splits.val, runtime=runtime, pre=pre, workers=config.workers)
    # Its limits: temperature and unknown-image test fitted on validation, kept in best.safetensors.
    alone = replace(runtime, group=SINGLE)  # (rank 0 alone from here)
    try:
        result.limits = fit_limits(model, splits, runtime=alone, pre=pre, workers=config.workers)
    except KeyboardInterrupt:  # every epoch is saved: a resume fits them again
        raise TrainingInterrupted(out, result.best_epoch, 0, while_="fitting the temperature and the unknown-image "
                                                                    "test (every epoch is saved)") from None
    if result.limits is not None:
        lim, rej = result.limits, result.limits.rejection
        add_to_checkpoint(result.best_checkpoint, tensors={confidence.REFERENCE: lim.reference} if rej else None,
                          **lim.checkpoint_meta())
        test = (f"unknown below familiarity {rej.threshold:g} ({rej.false_rejection:.1%} of validation images)" if rej
                else f"no unknown-image test (fewer than {confidence.MIN_VALIDATION} validation images)")
        callback.on_message(f"calibration: {lim.line()}; {test}")
    summary = {
        "data": str(data), "out": str(out), "classes": splits.classes, "counts": counts,
        "config": asdict(config), "runtime": runtime.describe(),
        "best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc,
        "best_metrics": result.best_metrics.to_dict(), "history": [asdict(r) for r in result.history],
        "skipped_files": result.skipped, "stopped": result.stopped, "training_s": result.training_time,
        "wall_time_s": time.perf_counter() - started,  # (rewritten at the end, with the pictures and the report)
        "estimate": asdict(result.estimate) if result.estimate else None, **result.chosen, **chose_arch,
        **(result.limits.summary() if result.limits else {}),
        "checkpoints": {"best": str(result.best_checkpoint), "last": str(result.last_checkpoint)},
    }
    try:
        result.files.update(write_run_files(out, inf=inf, splits=splits, pre=pre, history=result.history,
                                            summary=summary, features=result.features, limits=result.limits))
    except KeyboardInterrupt:  # the model and the run state are saved: a resume draws them again
        raise TrainingInterrupted(out, result.best_epoch, 0, while_="writing the pictures, summary.json and the "
                                                                    "report (every epoch is saved)") from None
    result.wall_time = summary["wall_time_s"] = time.perf_counter() - started  # the whole run
    write_summary(out, summary)
    return result


def _drop_unreadable(splits: DatasetSplits, *, fail: bool) -> dict[str, str]:
    """{path: reason} of the files that cannot be read, taken out of `splits`: every file's header
    (the check's fast part); with `fail`, every file decoded in full, and a ValueError listing them."""
    bad = unreadable_files((s.path for s in splits.train + splits.val), full=fail)
    if bad and fail:
        listing = "\n  ".join(f"{p}: {r}" for p, r in bad.items())
        raise ValueError(f"{len(bad)} file(s) cannot be read as images (bad_files='fail'):\n  {listing}\n"
                         "remove them, or let training skip them (--bad-files skip)")
    for path, reason in bad.items():
        log.warning("skipping %s: %s", path, reason)
    splits.train = [s for s in splits.train if str(s.path) not in bad]
    splits.val = [s for s in splits.val if str(s.path) not in bad]
    return bad


RESUME_OPTIONS = ("epochs", "budget", "workers", "threads", "timeout")  # what may change when a run resumes


def resume(run: str | os.PathLike[str], *, callback: Callback | None = None, **changes: Any) -> RunResult:
    """Continue the run in folder `run` from its last saved state, with its own data and config;
    `changes` may give it more epochs (or another budget, workers, threads: RESUME_OPTIONS). Any
    other option defines the run, and changing it is refused (ValueError naming the ones that may)."""
    state = Path(run) / STATE_FILE
    group = join(timeout=parse_duration(changes.get("timeout", TrainConfig.timeout)))
    if group.main and not state.exists() and Path(run).is_dir():
        raise FileNotFoundError(f"{run} has no run state (state.safetensors) to resume: the run stopped before it "
                                "first saved one. Start it again, without --resume")
    meta = group.broadcast(read_run_state(state, tensors=False).meta if group.main else None)  # rank 0's
    refused = sorted(set(changes) - set(RESUME_OPTIONS))
    if refused:
        flags = ", ".join("--" + n.replace("_", "-") for n in refused)
        raise ValueError(f"{flags} cannot change when a run resumes: they define the run {run}. What can: "
                         f"{', '.join('--' + n for n in RESUME_OPTIONS)}; start a new run for the rest")
    try:
        config = TrainConfig(**{**meta["config"], **changes})
        data = meta["data"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{state} lacks what a resume needs ({type(e).__name__}: {e}); it was not written by this "
                         "headstart's `train`. Start a new run") from None
    done = RunState.from_dict(meta["state"]).epoch if "state" in meta else 0
    if config.epochs < done:
        raise ValueError(f"--epochs {config.epochs} is fewer than the {done} epochs the run {run} has done already")
    return train(data, out=run, config=config, callback=callback, resume=True)
