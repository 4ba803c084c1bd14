"""`headstart report RUN...`: a run's report.html again, or several runs compared (`report.page`)."""

from __future__ import annotations

import argparse
from typing import Any

from headstart.cli.console import say


def cmd_report(a: argparse.Namespace) -> int:
    from headstart.report.page import write_report

    path = write_report(a.runs, out=a.out, overwrite=a.overwrite)
    say(f"report: {path}")
    return 0


def add_report(sub: Any, full: bool) -> None:
    """`headstart report`'s parser."""
    p = sub.add_parser("report", help="re-render a run's report.html, or compare several runs",
                       description="Render RUN/report.html from a run folder's files; with two or more runs, "
                                   "a side-by-side comparison (default: compare.html).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `headstart train`")
    p.add_argument("--out", default=None, help="HTML file to write (it replaces only a report)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever file --out names")
    p.set_defaults(func=cmd_report)
