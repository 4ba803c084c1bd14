"""`headstart` command line: each command parses, calls one library function, and prints."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from . import __version__

log = logging.getLogger("headstart")


# ---------------------------------------------------------------------------------------------
# Console output: progress bars and log lines that do not break them.

class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        text = f"{record.levelname.lower()}: {record.getMessage()}"  # a name that is not UTF-8 shown as \xNN
        tqdm.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"), file=sys.stderr)


def say(*args: Any, file: Any = None, sep: str = " ", end: str = "\n", flush: bool = False) -> None:
    """print() that survives a closed pipe (`headstart train ... | head`: output stops, work goes on)
    and a file name that is not valid UTF-8 (its odd bytes shown as \\xNN; files keep the bytes)."""
    stream = file or sys.stdout
    text = sep.join(map(str, args)) + end
    try:
        stream.write(text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))
        if flush:
            stream.flush()
    except BrokenPipeError:
        devnull = open(os.devnull, "w")
        os.dup2(devnull.fileno(), stream.fileno())


class ConsoleProgress:
    """A training callback: a bar per epoch phase, and the epoch line printed after each epoch."""

    def __init__(self) -> None:
        self.bar, self.key = None, None

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.key = None, None

    def on_start(self, info: dict[str, Any]) -> None:
        counts = info["counts"]
        say(f"classes: {', '.join(info['classes'])}")
        for split, c in counts.items():
            say(f"{split}: {sum(c.values())} images ({', '.join(f'{k} {v}' for k, v in c.items())})")
        cfg = info["config"]
        say(f"{cfg['arch']} weights={cfg['weights']} strategy={cfg['strategy']} epochs={cfg['epochs']} "
              f"batch={cfg['batch_size']} lr={cfg['lr']} momentum={cfg['momentum']} on {info['runtime']}")

    def on_step(self, phase: str, epoch: int, step: int, steps: int, loss: float | None) -> None:
        from tqdm import tqdm

        if self.key != (epoch, phase):
            self._close()
            self.key = (epoch, phase)
            self.bar = tqdm(total=steps, desc=f"epoch {epoch} {phase}" if epoch else phase, leave=False, file=sys.stderr,
                            disable=None, dynamic_ncols=True)
        self.bar.update(1)
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

    def on_epoch_end(self, record: Any) -> None:
        self._close()
        say(record.line(), flush=True)

    def on_message(self, text: str) -> None:
        self._close()
        say(text, flush=True)


def _download_bar():
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def progress(done: int, total: int | None) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, unit="B", unit_scale=True, desc="download", file=sys.stderr,
                                disable=None)
        bar = state["bar"]
        bar.update(done - bar.n)
        if total is not None and done >= total:
            bar.close()

    return progress


# ---------------------------------------------------------------------------------------------
# Commands.

def _train_config(a: argparse.Namespace, **override: Any):
    """The TrainConfig of the parsed flags (every field that has one), with `override`."""
    from .training import TrainConfig

    given = {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(a, f.name)}
    return TrainConfig(**{**given, **override})


def _print_run(result: Any) -> None:
    after = result.wall_time - result.training_time
    say(f"best val acc {result.best_val_acc:.4f} (epoch {result.best_epoch}); wall time {result.wall_time:.1f}s: "
        f"training {result.training_time:.1f}s, then calibration, pictures and report {after:.1f}s"
        + (f" (estimated {result.estimate.short()})" if result.estimate else ""))
    last = result.history[-1].epoch if result.history else 0
    say(f"stopped: {result.stopped}" if result.stopped else f"trained every epoch ({last})")
    if result.skipped:
        say(f"skipped {len(result.skipped)} undecodable file(s): {', '.join(result.skipped)}")
    say(f"best checkpoint: {result.best_checkpoint}")
    say(f"last checkpoint: {result.last_checkpoint}")
    for name, path in result.files.items():
        say(f"{name}: {path}")


def _given_options(a: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line (those that differ from their default)."""
    from .training import TrainConfig

    return {f.name: getattr(a, f.name) for f in dataclasses.fields(TrainConfig)
            if hasattr(a, f.name) and getattr(a, f.name) != f.default}


class RankLog:
    """The training callback of a data-parallel run's ranks but rank 0: they log at debug level."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_start(self, info: dict[str, Any]) -> None: ...
    def on_step(self, phase: str, epoch: int, step: int, steps: int, loss: float | None) -> None: ...

    def on_epoch_end(self, record: Any) -> None:
        log.debug("rank %d: %s", self.rank, record.line())

    def on_message(self, text: str) -> None:
        log.debug("rank %d: %s", self.rank, text)


def cmd_train(a: argparse.Namespace) -> int:
    from .distributed import launch, launched, rank
    from .runfolder import default_run_folder
    from .training import resume, train

    if a.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {a.nproc}")
    if a.nproc > 1 and not launched():  # torchrun runs this same command line, less --nproc, as each rank
        return launch(_without(a.argv, "--nproc"), nproc=a.nproc)
    callback = ConsoleProgress() if rank() == 0 else RankLog(rank())
    if a.resume:
        if a.data:
            raise ValueError(f"--resume takes the data and options of the run {a.resume}; drop {a.data!r}")
        result = resume(a.resume, callback=callback, **_given_options(a))
    elif not a.data:
        raise ValueError("DATA is missing: pass a dataset folder, or --resume RUN to continue a run")
    else:
        config = _train_config(a)
        name = Path(a.data).resolve().stem if Path(a.data).is_file() else Path(a.data).resolve().name  # (a table's)
        out = a.out or default_run_folder(a.data, f"{name}-{config.arch}-{config.strategy}")
        result = train(a.data, out=out, config=config, callback=callback, overwrite=a.overwrite)
    if rank() == 0:
        _print_run(result)
    return 0


def _without(argv: Sequence[str], flag: str) -> list[str]:
    """`argv` less `flag` and its value (`--flag V` or `--flag=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


def _format_metrics(m: Any) -> str:
    lines = [f"images: {m.n}   accuracy: {m.accuracy:.4f}   balanced accuracy: {m.balanced_accuracy:.4f}   "
             f"loss: {m.loss:.4f}" + (f"   ECE: {m.ece:.4f}" if m.ece is not None else ""), ""]
    width = max(8, *(len(c.name) for c in m.per_class))
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for c in m.per_class:
        lines.append(f"{c.name:<{width}}  {c.precision:9.4f}  {c.recall:6.4f}  {c.f1:5.4f}  {c.support:7d}")
    lines += ["", "confusion matrix (rows: true, columns: predicted)"]
    names = [c.name for c in m.per_class]
    lines.append(" " * width + "  " + "  ".join(f"{n:>{max(5, len(n))}}" for n in names))
    for name, row in zip(names, m.confusion):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{max(5, len(n))}}" for v, n in zip(row, names)))
    if m.skipped:
        lines.append(f"\nskipped {len(m.skipped)} undecodable file(s): {', '.join(m.skipped)}")
    return "\n".join(lines)


TABLE_OPTIONS = ("path_column", "label_column", "allow_outside")  # DATA as a table of labels: TrainConfig's fields


def _columns(a: argparse.Namespace) -> Any:
    """How DATA is read where it is a table of labels (data.Columns), from the table options."""
    from .data import Columns

    return Columns(getattr(a, "path_column", None), getattr(a, "label_column", None),
                   getattr(a, "allow_outside", False))


def _model_file(a: argparse.Namespace, checkpoint: str | None) -> str:
    """The checkpoint, --weights or --model (an exported file); exactly one of them."""
    given = [v for v in (checkpoint, a.weights, getattr(a, "model", None)) if v]
    if len(given) > 1:
        raise ValueError(f"give one model: a checkpoint, --weights or --model, not {' and '.join(given)}")
    if not given:
        raise ValueError("which model? pass a checkpoint (a run's best.safetensors), --weights FILE, or --model "
                         "F.onnx (written by `headstart export`)")
    if checkpoint and a.arch:
        raise ValueError("--arch goes with --weights; a checkpoint knows its architecture")
    return given[0]


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluation import METRICS_JSON, evaluate, write_metrics_json
    from .outputs import claim

    checkpoint = _model_file(a, a.checkpoint)
    if a.json:
        claim(a.json, METRICS_JSON, overwrite=a.overwrite)  # refused before the work, not after
    m = evaluate(checkpoint, a.data, columns=_columns(a), batch_size=a.batch_size, workers=a.workers, precision=a.precision,
                 device=a.device, threads=a.threads, compile=a.compile, engine=a.engine, arch=a.arch,
                 classes=a.classes)
    say(_format_metrics(m))
    if a.json:
        say(f"\nmetrics written to {write_metrics_json(a.json, m, overwrite=a.overwrite)}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from .prediction import predict

    named = a.weights or a.model  # then the first positional is an image too
    paths = ([a.checkpoint] if named else []) + a.paths
    if not paths:
        raise ValueError("no images given: pass image files or folders after the checkpoint")
    checkpoint = _model_file(a, None if named else a.checkpoint)
    preds = predict(checkpoint, paths, top_k=a.top_k, batch_size=a.batch_size, workers=a.workers,
                    precision=a.precision, device=a.device, threads=a.threads, compile=a.compile,
                    engine=a.engine, arch=a.arch, classes=a.classes, reject=a.reject)
    if a.format == "json":
        # (no unknown-image test ran, as for an exported file: `unknown` is null, not false, as CSV leaves it blank)
        say(json.dumps([{**asdict(p), "unknown": None if p.familiarity is None else p.unknown} for p in preds],
                       indent=2))
    elif a.format == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "class", "probability", "top_k", "error", "familiarity", "unknown"])
        for p in preds:
            w.writerow([p.path, p.label or "", f"{p.probability:.6f}",
                        ";".join(f"{c}:{q:.6f}" for c, q in p.top_k), p.error or "",
                        *(["", ""] if p.familiarity is None else [f"{p.familiarity:.4f}", int(p.unknown)])])
        say(buf.getvalue(), end="")
    else:
        width = max([len(p.path) for p in preds] + [4])
        for p in preds:
            if p.error:
                say(f"{p.path:<{width}}  ERROR {p.error}")
            else:
                top = ", ".join(f"{c} {q:.3f}" for c, q in p.top_k)
                known = "" if p.familiarity is None else f"   familiarity {p.familiarity:.3f}"
                if p.unknown:
                    say(f"{p.path:<{width}}  {'unknown':<12} {'':5}   nearest: {top}{known}")
                else:
                    say(f"{p.path:<{width}}  {p.label:<12} {p.probability:.3f}   top-{len(p.top_k)}: {top}{known}")
    bad = sum(1 for p in preds if p.error)
    if bad:
        say(f"{bad} of {len(preds)} file(s) could not be read as images", file=sys.stderr)
    return 1 if preds and bad == len(preds) else 0  # (scripts see that nothing was predicted)


def _format_check(r: Any, *, shown: int = 5) -> str:
    lines = [f"{r.root}: {r.files} image files, {len(r.classes)} classes", ""]
    width = max([len(c) for c in r.classes] + [5])
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in r.splits))
    for c in r.classes:
        lines.append(f"{c:<{width}}  " + "  ".join(f"{r.counts[s].get(c, 0):>6}" for s in r.splits))
    for s in r.splits:
        n = [v for v in r.counts[s].values() if v]
        if len(n) > 1:
            lines.append(f"{s}: largest class / smallest class = {max(n) / min(n):.2f}")
    lines += ["", f"{len(r.findings)} finding(s), worst first:" if r.findings else "no findings"]
    for f in r.findings:
        lines.append(f"{f.severity.upper():7} [{f.kind}] {f.message}")
        lines += [f"          {p}" for p in f.paths[:shown]]
        if len(f.paths) > shown:
            lines.append(f"          ... and {len(f.paths) - shown} more")
    return "\n".join(lines)


def cmd_check(a: argparse.Namespace) -> int:
    from .check import CHECK_JSON, check_dataset, write_check_json
    from .limits import LABEL_CSV, write_label_csv
    from .outputs import claim

    if a.csv and not a.labels:
        raise ValueError("--csv writes the label check's ranking: add --labels")
    for path, kind in ((a.json, CHECK_JSON), (a.csv, LABEL_CSV)):
        if path:
            claim(path, kind, overwrite=a.overwrite)  # refused before the work, not after
    report = check_dataset(a.data, val_split=a.val_split, image_size=a.image_size, columns=_columns(a))
    say(_format_check(report))
    rows = None
    if a.labels:
        from .limits import find_label_issues

        rows = find_label_issues(a.data, arch=a.arch, val_split=a.val_split, columns=_columns(a), workers=a.workers)
        say("\n" + _format_label_issues(rows, a.labels_shown))
    if a.json:
        labels = [r.to_dict(i) for i, r in enumerate(rows, 1)] if rows is not None else None
        say(f"\nfindings{' and label check' if rows is not None else ''} written to "
            f"{write_check_json(a.json, report, labels=labels, overwrite=a.overwrite)}")
    if a.csv:
        say(f"every image's label quality written to {write_label_csv(a.csv, rows, overwrite=a.overwrite)}")
    blocking = report.blocking(a.allow.split(",") if a.allow else ())  # (a kind that no check reports: ValueError)
    if blocking:
        kinds = sorted({f.kind for f in blocking})
        say(f"\ntraining on this data would be wrong ({', '.join(kinds)}); fix it, or pass "
              f"--allow {','.join(kinds)} to accept it", file=sys.stderr)
        return 1
    return 0


def _format_label_issues(rows: Sequence[Any], shown: int) -> str:
    suspects = [r for r in rows if r.suspect]
    lines = [f"labels: {len(suspects)} of {len(rows)} images are likely mislabelled (another class is confidently "
             "more likely, by a linear head on the backbone's features that never saw the image)"]
    if suspects:
        width = max(len(r.given) for r in suspects[:shown])
        lines.append(f"  {'quality':>7}  {'given':<{width}}  suggested    file")
        for r in suspects[:shown]:
            lines.append(f"  {r.quality:7.3f}  {r.given:<{width}}  {r.suggested:<11}  {r.path}")
        if len(suspects) > shown:
            lines.append(f"  ... {len(suspects) - shown} more (--csv FILE writes every image's label quality)")
    return "\n".join(lines)


def cmd_similar(a: argparse.Namespace) -> int:
    from .limits import find_similar

    for result in find_similar(a.checkpoint, a.images, data=a.data, k=a.k, workers=a.workers, columns=_columns(a)):
        say(result.path)
        if result.error:
            say(f"  error: {result.error}")
        for n in result.nearest:
            say(f"  {n.similarity:.3f}  {n.label:<12}  {n.path}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(a.runs, out=a.out, overwrite=a.overwrite)
    say(f"report: {path}")
    return 0


def cmd_show(a: argparse.Namespace) -> int:
    from .plots import show_batch

    path = show_batch(a.data, out=a.out, batch_size=a.batch_size, seed=a.seed, image_size=a.image_size,
                      val_split=a.val_split, columns=_columns(a), overwrite=a.overwrite)
    say(f"batch picture: {path}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    res = run_demo(data=a.data, out=a.out, config=_train_config(a), callback=ConsoleProgress(),
                   progress=_download_bar(), overwrite=a.overwrite)
    say(f"\ndataset: {res.data}\n  {res.about}")
    say(f"training batch picture: {res.batch_picture}")
    for strategy, run in res.runs.items():
        say(f"\n[{strategy}] ", end="")
        _print_run(run)
    say(f"\ndemo: {res.wall_time:.1f}s (estimated {res.estimate_s:.1f}s); everything is in {res.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# Parser.

RUNTIME_OPTIONS = ("precision", "device", "workers", "threads", "compile", "engine")  # inference commands take these


def _add_options(p: argparse.ArgumentParser, names: Iterable[str] | None = None, *,
                 exclude: Iterable[str] = ()) -> None:
    """A flag for each of TrainConfig's fields (all, or `names`, less `exclude`), with the field's
    type, default, choices and help: an option is declared once, in training.TrainConfig."""
    from .training import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if (names is not None and f.name not in names) or f.name in exclude:
            continue
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        text = f.metadata["help"]
        text = (text() if callable(text) else text).replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            p.add_argument(flag, action="store_true", help=f"{text} (default: off)")
            continue
        if f.default is not None or "default" not in text:
            text += f" (default: {'none' if f.default is None else f.default})"
        parse = f.metadata["parse"]
        p.add_argument(flag, type=_argument_type(parse) if parse else kind, default=f.default,
                       choices=f.metadata["choices"], help=text)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; given `command`, only that one gets the options derived from
    TrainConfig (their import brings torch, 2-3 s: `headstart --help` or `check` need not wait)."""
    def full(name: str) -> bool:
        return command in (None, name)

    parser = argparse.ArgumentParser(
        prog="headstart", description="Transfer learning on folders of labelled images.")
    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name -> its parser (parse_args re-reads a command's own arguments)

    p = sub.add_parser("train", help="train a classifier on DATA (train/ and val/ class folders)",
                       description="Train a classifier from a pretrained backbone on a class-per-folder dataset.")
    p.add_argument("data", nargs="?", help="dataset folder: train/ and val/ with one sub-folder per class (or class "
                                           "folders alone, with --val-split); or a table of labels: a .csv or .tsv "
                                           "with a path and a label column")
    p.add_argument("--out", default=None, help="run folder (default: runs/<data>-<arch>-<strategy>, or with -2, -3... "
                                               "where that holds a run; under the current folder, or beside the "
                                               "dataset where that would be inside it)")
    p.add_argument("--resume", default=None, metavar="RUN",
                   help="continue the run in folder RUN from its last saved state, with its data and options (more "
                        "--epochs, another --budget, --workers, --threads or --timeout may be given; a data-parallel run: "
                        "with --nproc again, or under torchrun)")
    p.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel training in N processes on this machine, launched with torchrun (the same "
                        "results as one process; several machines: see the README)")
    if full("train"):
        _add_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class metrics and confusion matrix of a checkpoint",
                       description="Evaluate a checkpoint on DATA (its val/ folder if it has one).")
    p.add_argument("checkpoint", nargs="?", help="a run's best.safetensors or last.safetensors (or a file written by "
                                                 "`headstart export`)")
    p.add_argument("data", help="class-per-folder images (or a dataset root with val/), or a table of labels (.csv, "
                                ".tsv: its val rows where it has a split column)")
    _add_weights_file(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics as JSON")
    p.add_argument("--overwrite", action="store_true", help="--json may replace whatever file it names")
    if full("evaluate"):
        _add_inference_options(p)
        _add_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files or folders with a checkpoint",
                       description="Predict the class of each image (folders are searched recursively).")
    p.add_argument("checkpoint", help="a run's best.safetensors or last.safetensors (omit it with --weights)")
    p.add_argument("paths", nargs="*", help="image files and/or folders")
    _add_weights_file(p)
    p.add_argument("--top-k", type=int, default=5, help="default: 5")
    p.add_argument("--format", default="table", choices=["table", "csv", "json"], help="default: table")
    _add_reject(p)
    p.add_argument("--model", default=None, metavar="FILE",
                   help="instead of a checkpoint: a model written by `headstart export` (.onnx, OpenVINO .xml)")
    if full("predict"):
        _add_inference_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("check", help="check a dataset before training: broken files, duplicates, leakage...",
                       description="Read every file once and report problems, worst first. Exits 1 when "
                                   "training would be wrong (leakage, a class missing from a split, an empty "
                                   "class folder) unless --allow names those kinds.")
    p.add_argument("data", help="dataset folder, or a table of labels (.csv, .tsv)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the report (and the label check) as JSON")
    p.add_argument("--overwrite", action="store_true", help="--json and --csv may replace whatever files they name")
    p.add_argument("--allow", default="", metavar="KINDS",
                   help="comma-separated kinds of error to accept, e.g. leakage,class-missing")
    p.add_argument("--image-size", type=int, default=224, help="crop size, for the tiny-image check (default: 224)")
    p.add_argument("--val-split", type=float, default=None)
    p.add_argument("--labels", action="store_true",
                   help="also rank the images whose label is likely wrong (confident learning on a pretrained "
                        "backbone's features: one backbone pass per image, kept in the feature cache)")
    p.add_argument("--arch", default="resnet50", help="--labels: the backbone (default: resnet50)")
    p.add_argument("--csv", default=None, metavar="FILE", help="--labels: write every image's label quality")
    p.add_argument("--labels-shown", type=int, default=20, metavar="N", help="--labels: suspects listed (default: 20)")
    p.add_argument("--workers", type=int, default=2, help="--labels: data-loading worker processes (default: 2)")
    if full("check"):
        _add_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("similar", help="the training images nearest to each image, by the model's backbone features",
                       description="For each IMAGE (files or folders), the K training images of DATA most similar by "
                                   "the checkpoint's backbone features (cosine): why a model sees an image as it does.")
    p.add_argument("checkpoint", help="a run's best.safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--in", dest="data", required=True, metavar="DATA",
                   help="the training images: a dataset (its train/ folder), a folder of images, or a table of "
                        "labels (its train rows)")
    p.add_argument("-k", type=int, default=5, help="images per query (default: 5)")
    p.add_argument("--workers", type=int, default=2, help="data-loading worker processes (default: 2)")
    if full("similar"):
        _add_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_similar)

    p = sub.add_parser("report", help="re-render a run's report.html, or compare several runs",
                       description="Render RUN/report.html from a run folder's files; with two or more runs, "
                                   "a side-by-side comparison (default: compare.html).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `headstart train`")
    p.add_argument("--out", default=None, help="HTML file to write (it replaces only a report)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever file --out names")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("show", help="draw a training batch with its labels",
                       description="Draw one augmented training batch of DATA, titled with the labels.")
    p.add_argument("data", help="dataset folder, or a table of labels (.csv, .tsv)")
    p.add_argument("--out", default="batch.png", help="picture to write (default: batch.png); it replaces only a "
                                                      "picture headstart drew")
    p.add_argument("--overwrite", action="store_true", help="replace whatever file --out names")
    p.add_argument("--batch-size", type=int, default=18)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--val-split", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    if full("show"):
        _add_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("demo", help="the tutorial end to end: both strategies, pictures, checkpoints",
                       description="Run the ResNet50 transfer-learning tutorial end to end: show a batch, "
                                   "fine-tune all layers, then train only the head on a frozen backbone.")
    p.add_argument("--data", default=None,
                   help="dataset folder (default: the tutorial's Canidae_data.zip, downloaded once; offline, solar "
                        "cells from the package index)")
    p.add_argument("--out", default=None, help="default: runs/demo (runs/demo-2... when that holds a demo)")
    p.add_argument("--overwrite", action="store_true", help="replace a demo (or any files of the same names) in --out")
    if full("demo"):
        _add_options(p, exclude=["strategy"])
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("weights", help="list weight sources and whether each is cached; fetch one",
                       description="List every backbone's weight sources and whether each is in the cache, or "
                                   "`fetch NAME [--tag TAG]` to download, verify and convert one now.")
    p.add_argument("action", nargs="?", default="list", choices=["list", "fetch"])
    p.add_argument("name", nargs="?", help="backbone, for fetch (e.g. resnet50)")
    p.add_argument("--tag", default="imagenet", help="which of its sources (default: imagenet)")
    p.set_defaults(func=cmd_weights)

    p = sub.add_parser("models", help="list the registered backbones and their weight sources",
                       description="List the registered backbones and their weight sources.")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("export", help="export a model with its preprocessing to ONNX or OpenVINO, checked on real images",
                       description="Write CKPT as ONNX (--format onnx) or OpenVINO IR (--format openvino): uint8 "
                                   "(N, S, S, 3) RGB crops in, logits and probabilities out, normalisation inside, "
                                   "classes and preprocessing in its metadata. Every export is checked against "
                                   "headstart's own inference on real images (the run's validation images, or "
                                   "--images) and removed if they disagree.")
    p.add_argument("checkpoint", nargs="?", help="a run's best.safetensors (or --weights)")
    p.add_argument("--format", default=None, choices=["onnx", "openvino"],
                   help="default: from --out's suffix (.onnx, .xml), else onnx")
    p.add_argument("--out", default=None, help="the file to write (default: beside CKPT, .onnx or .xml); it replaces "
                                               "only an export of the same format")
    p.add_argument("--overwrite", action="store_true", help="replace whatever file --out names")
    p.add_argument("--images", nargs="+", default=[], metavar="PATH",
                   help="images (files or folders) to check the export on (default: the run's validation images)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "int8"],
                   help="int8 (with --format openvino): weights and activations quantized by NNCF, calibrated on "
                        "--calibration; the check then allows validation accuracy 0.5 points below fp32 at most "
                        "(default: fp32)")
    p.add_argument("--calibration", nargs="+", default=[], metavar="PATH",
                   help="int8: images to set the quantization ranges on (default: 300 of the run's training "
                        "images, else --images)")
    _add_weights_file(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="a prediction service with a web page: POST /predict, GET /model, /health, /",
                       description="Serve a model over HTTP: POST /predict with images (multipart or raw bytes) "
                                   "gives JSON with the top classes; GET / is a page to drop images on. Concurrent "
                                   "requests are batched together. Binds to 127.0.0.1 unless --host says otherwise: "
                                   "--host 0.0.0.0 lets every machine that reaches this one use the model (there is "
                                   "no authentication).")
    p.add_argument("checkpoint", nargs="?", help="a run's best.safetensors (or --weights)")
    _add_weights_file(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="default: 8000")
    p.add_argument("--max-upload", type=_size, default="8MB", help="the most a request may send (default: 8MB)")
    p.add_argument("--top-k", type=int, default=5, help="default: 5")
    p.add_argument("--max-batch", type=int, default=16, help="images batched together at most (default: 16)")
    p.add_argument("--max-wait", type=float, default=0.0,
                   help="ms a batch waits for more images after its first (default: 0: it takes what arrived while "
                        "the last batch ran)")
    _add_reject(p)
    _add_precision(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("convert", help="convert weights or a checkpoint: headstart, safetensors, .pth, MindSpore .ckpt",
                       description="Convert IN to OUT. IN: a headstart checkpoint or a weights file (.ckpt, .pth, "
                                   ".safetensors, model.json). OUT's format comes from its extension (.safetensors: "
                                   "headstart checkpoint, .pth/.pt: torchvision state dict, .ckpt: MindSpore "
                                   "tutorial ResNet) unless --to says otherwise.")
    p.add_argument("input", metavar="IN")
    p.add_argument("output", metavar="OUT")
    p.add_argument("--to", default=None, choices=["headstart", "safetensors", "pth", "mindspore"],
                   help="output format (default: from OUT's extension); safetensors = plain weights")
    p.add_argument("--arch", default=None, help="backbone of a plain weights file IN (default: resnet50)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="names of the head's outputs, comma-separated or a file with one per line")
    p.add_argument("--overwrite", action="store_true",
                   help="replace whatever file OUT names (else it replaces only a file of its format headstart wrote)")
    p.set_defaults(func=cmd_convert)
    return parser


def _add_inference_options(p: argparse.ArgumentParser) -> None:
    from .inference import INFERENCE_BATCH_SIZE

    p.add_argument("--batch-size", type=int, default=INFERENCE_BATCH_SIZE,
                   help=f"images per batch (default: {INFERENCE_BATCH_SIZE})")
    _add_precision(p)
    _add_options(p, RUNTIME_OPTIONS, exclude=["precision"])


def _add_precision(p: argparse.ArgumentParser) -> None:
    from .runtime import PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 where the CPU or GPU supports it, else fp32 (or an int8 model made before, "
                        "where it ran faster and the CPU has no bf16); int8: the model quantized by NNCF, made once "
                        "and cached (calibrated on the run's training images and checked on its validation images; "
                        "outside a run folder, on the images given), run by OpenVINO; needs pip install "
                        "'headstart[int8]' (default: auto)")


def _add_reject(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reject", default="auto", metavar="off|auto|VALUE",
                   help="call an image `unknown` when it looks unlike the training data: its familiarity (the share "
                        "of validation images that look less familiar) is under VALUE; auto: the checkpoint's "
                        "threshold, fitted to reject 5%% of its validation images; off: never (needed with "
                        "--precision int8, which computes no features) (default: auto)")


def _add_weights_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="instead of a checkpoint: weights with their head: a file or URL (MindSpore .ckpt, .pth, "
                        ".safetensors) or a tag of --arch such as imagenet")
    p.add_argument("--arch", default=None, help="backbone of --weights (default: resnet50)")
    p.add_argument("--classes", default=None, metavar="NAMES",
                   help="names of the head's outputs, comma-separated or a file with one per line")


def _argument_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """`parse` for argparse: its ValueError's own words (which name the format) as the error."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def _size(text: str) -> int:
    """Bytes in '8MB', '512kB', '1GB' or a plain number."""
    units = {"gb": 2**30, "mb": 2**20, "kb": 2**10, "b": 1}
    t = text.strip().lower()
    for unit, factor in units.items():
        if t.endswith(unit) and t[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(t[:-len(unit)]) * factor)
    if t.isdigit():
        return int(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not a size like 8MB, 512kB or 1048576")


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export

    result = export(_model_file(a, a.checkpoint), format=a.format, out=a.out, images=a.images,
                    precision=a.precision, calibration=a.calibration, arch=a.arch, classes=a.classes,
                    overwrite=a.overwrite)
    say(f"wrote {', '.join(map(str, result.files))} ({result.format}: {len(result.classes)} classes)")
    say(result.parity.line())
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .serve import serve

    serve(_model_file(a, a.checkpoint), host=a.host, port=a.port, max_upload=a.max_upload, arch=a.arch,
          classes=a.classes, top_k=a.top_k, max_batch=a.max_batch, max_wait=a.max_wait / 1000, precision=a.precision,
          reject=a.reject, on_ready=lambda url: say(f"serving on {url} (Ctrl-C stops it)", flush=True))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from .convert import convert

    result = convert(a.input, a.output, to=a.to, arch=a.arch, classes=a.classes, overwrite=a.overwrite)
    say(f"wrote {result.path} ({result.format}: {result.tensors} tensors, {result.arch}, "
        f"{len(result.classes)} classes)")
    if result.skipped:
        say(f"skipped {len(result.skipped)} tensors that are not weights: {', '.join(result.skipped[:10])}"
            f"{' ...' if len(result.skipped) > 10 else ''}")
    for note in result.notes:
        say(f"note: {note}")
    return 0


def cmd_weights(a: argparse.Namespace) -> int:
    from .download import cache_dir
    from .models import fetch_weights, weight_sources

    if a.action == "fetch":
        if not a.name:
            raise ValueError("which weights? e.g. `headstart weights fetch resnet50` (see `headstart weights`)")
        say(f"{a.name} {a.tag}: {fetch_weights(a.name, a.tag, progress=_download_bar())}")
        return 0
    say(f"cache: {cache_dir()}")
    sources = weight_sources()
    width = max(len(name) for name, *_ in sources)
    for name, tag, src, cached in sources:
        say(f"{name:<{width}}  {tag:<12} {'cached ' if cached else 'not yet'}  {src.describe()}")
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    from .models import get_model_info, list_models, stage_names

    width = max(len(name) for name in list_models())
    for name in list_models():
        info = get_model_info(name)
        sources = ", ".join(f"{tag}={src.describe()}" for tag, src in info.weights.items()) or "none"
        say(f"{name:<{width}}  {info.description}\n{'':<{width}}  weights: {sources}\n"
            f"{'':<{width}}  stages (--train-from): {', '.join(stage_names(name))}")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, options anywhere between the positionals (`predict CKPT --top-k 1 IMG`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None) or "")
    known, rest = parser.parse_known_args(argv)
    if rest and getattr(known, "command", None):  # what argparse's one pass left: the command's, intermixed
        start = argv.index(known.command) + 1
        command = parser.commands[known.command].parse_intermixed_args(argv[start:])
        return argparse.Namespace(**{**vars(known), **vars(command)})
    return parser.parse_args(argv)


def _exit_at_once(signum: int, frame: object) -> None:
    os.write(2, b"interrupted\n")
    os._exit(130)


_HEAVY = {"train": ("training",), "demo": ("training",), "similar": ("limits",), "predict": ("prediction",),
          "evaluate": ("evaluation",), "export": ("export",), "serve": ("serve",)}  # the commands that run a network: their modules


def _import_what_runs(command: str | None) -> None:
    """The modules a command that runs a network needs (torch, the models, OpenVINO), imported before
    it runs: a Ctrl-C while Python imports can surface as an "Exception ignored" traceback from
    inside importlib, so the imports run while a Ctrl-C simply ends the process (nothing has been
    written yet). Other commands import what they need as they go."""
    import importlib

    if command not in _HEAVY:
        return
    for module in _HEAVY[command]:
        importlib.import_module(f"{__package__}.{module}")
    from .engine import _import_openvino, openvino_available

    if openvino_available():
        try:
            _import_openvino()
        except ImportError:  # a broken install: the engine falls back to PyTorch later, and says so
            pass


def main(argv: Sequence[str] | None = None) -> int:
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()  # (signals are set there only)
    on_sigint = signal.signal(signal.SIGINT, _exit_at_once) if main_thread else None  # see _import_what_runs
    try:
        try:
            args = parse_args(argv)
            args.argv = list(sys.argv[1:] if argv is None else argv)
            level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
            from .distributed import rank

            if rank():  # a data-parallel run's other ranks: only rank 0 speaks
                level = logging.DEBUG if args.verbose >= 2 else logging.ERROR
            log.handlers[:] = [_TqdmHandler()]
            log.setLevel(level)
            log.propagate = False
            import warnings

            from PIL import Image

            # The pixel limit is headstart's own check (data.open_image), the same everywhere; Pillow's own
            # warning for images between 1x and 2x of it would only say it twice.
            warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
            _import_what_runs(getattr(args, "command", None))
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, on_sigint)
        from .runstate import RankLost, TrainingInterrupted

        try:
            return args.func(args)
        except TrainingInterrupted as e:  # a data-parallel run's ranks stop together: rank 0 says so
            if main_thread:  # saved and ending: another SIGINT (torchrun's agent sends its own while it shuts the
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # ranks down) would only print a traceback from atexit
            if isinstance(e, RankLost) or not rank():  # (a lost rank: each one)
                say(f"\n{e}", file=sys.stderr)
            return 1 if isinstance(e, RankLost) else 130
    except RuntimeError as e:  # a data-parallel run's collective that failed outside the epochs (features, plan)
        from .distributed import is_rank_failure, launched, rank

        if not (launched() and is_rank_failure(e)):
            raise
        say(f"rank {rank()}: another rank died or stopped answering ({str(e).strip().splitlines()[0][:300]})",
            file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as e:  # FileNotFoundError, PermissionError, ConnectionError too
        say(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before or after training (a training run saves and says how to resume)
        say("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
