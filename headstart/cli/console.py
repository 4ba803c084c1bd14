"""Console output: `say` (print that survives a closed pipe), progress bars and log lines that do
not break them, and what a finished run prints.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Console output: progress bars and log lines that do not break them.

class TqdmHandler(logging.Handler):
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


def download_bar():
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


def print_run(result: Any) -> None:
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
