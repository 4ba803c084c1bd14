"""`headstart` command line: one file per command (train.py, predict.py, ...), each with its
parser (`add_<command>`) and `cmd_<command>`, which parses, calls one library function and prints
(console.py); options.py derives the flags from TrainConfig. `main` runs a command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from headstart.cli.console import TqdmHandler, say
from headstart.version import __version__

log = logging.getLogger("headstart")  # the library's loggers are its children: one handler, one level


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, each added by its module's `add_<command>(sub, full)`; given
    `command`, only that one is `full`: it alone gets the options derived from TrainConfig (their
    import brings torch, 2-3 s: `headstart --help` or `check` need not wait)."""
    def full(name: str) -> bool:
        return command in (None, name)

    parser = argparse.ArgumentParser(
        prog="headstart", description="Transfer learning on folders of labelled images.")
    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-v: info, -vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.commands = sub.choices  # name -> its parser (parse_args re-reads a command's own arguments)
    from headstart.cli import (check, convert, demo, evaluate, export, models, predict, report, serve, show, similar,
                               train, weights)

    for module in (train, evaluate, predict, check, similar, report, show, demo, weights, models, export, serve,
                   convert):  # in --help's order
        name = module.__name__.rpartition(".")[2]
        getattr(module, f"add_{name}")(sub, full(name))
    return parser


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


# The commands that run a network: their modules.
_HEAVY = {"train": ("training.run",), "demo": ("training.run",), "similar": ("infer.similar",),
          "predict": ("infer.prediction",), "evaluate": ("infer.evaluation",), "export": ("export.writers",),
          "serve": ("serve.app",)}


def _import_what_runs(command: str | None) -> None:
    """The modules a command that runs a network needs (torch, the models, OpenVINO), imported before
    it runs: a Ctrl-C while Python imports can surface as an "Exception ignored" traceback from
    inside importlib, so the imports run while a Ctrl-C simply ends the process (nothing has been
    written yet). Other commands import what they need as they go."""
    import importlib

    if command not in _HEAVY:
        return
    for module in _HEAVY[command]:
        importlib.import_module(f"headstart.{module}")
    from headstart.runtime.openvino import import_openvino, openvino_available

    if openvino_available():
        try:
            import_openvino()
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
            from headstart.runtime.distributed import rank

            if rank():  # a data-parallel run's other ranks: only rank 0 speaks
                level = logging.DEBUG if args.verbose >= 2 else logging.ERROR
            log.handlers[:] = [TqdmHandler()]
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
        try:
            return args.func(args)
        except Exception as e:
            # Only an interrupted run is handled here. Its module is loaded by then: a command that trains
            # nothing need not import the training stack to tell (training/interrupts.py).
            interrupts = sys.modules.get("headstart.training.interrupts")
            if interrupts is None or not isinstance(e, interrupts.TrainingInterrupted):
                raise
            lost = isinstance(e, interrupts.RankLost)  # a data-parallel run's ranks stop together: rank 0 says so
            if main_thread:  # saved and ending: another SIGINT (torchrun's agent sends its own while it shuts the
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # ranks down) would only print a traceback from atexit
            if lost or not rank():  # (a lost rank: each one)
                say(f"\n{e}", file=sys.stderr)
            return 1 if lost else 130
    except RuntimeError as e:  # a data-parallel run's collective that failed outside the epochs (features, plan)
        from headstart.runtime.distributed import is_rank_failure, launched, rank

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
