"""`headstart train DATA`: a run (`training.train`), or `--resume RUN`; `--nproc N` launches torchrun."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from headstart.cli.console import ConsoleProgress, RankLog, print_run
from headstart.cli.options import add_config_options, given_options, train_config


def cmd_train(a: argparse.Namespace) -> int:
    from headstart.io.runfolder import default_run_folder
    from headstart.runtime.distributed import launch, launched, rank
    from headstart.training import resume, train

    if a.nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {a.nproc}")
    if a.nproc > 1 and not launched():  # torchrun runs this same command line, less --nproc, as each rank
        return launch(_without(a.argv, "--nproc"), nproc=a.nproc)
    callback = ConsoleProgress() if rank() == 0 else RankLog(rank())
    if a.resume:
        if a.data:
            raise ValueError(f"--resume takes the data and options of the run {a.resume}; drop {a.data!r}")
        result = resume(a.resume, callback=callback, **given_options(a))
    elif not a.data:
        raise ValueError("DATA is missing: pass a dataset folder, or --resume RUN to continue a run")
    else:
        config = train_config(a)
        name = Path(a.data).resolve().stem if Path(a.data).is_file() else Path(a.data).resolve().name  # (a table's)
        out = a.out or default_run_folder(a.data, f"{name}-{config.arch}-{config.strategy}")
        result = train(a.data, out=out, config=config, callback=callback, overwrite=a.overwrite)
    if rank() == 0:
        print_run(result)
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


def add_train(sub: Any, full: bool) -> None:
    """`headstart train`'s parser (`full`: see build_parser)."""
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
                        "results as one process; several machines: see docs/distributed.md)")
    if full:
        add_config_options(p)
    p.set_defaults(func=cmd_train)
