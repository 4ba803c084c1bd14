"""`headstart check DATA`: the dataset's problems, worst first (`analysis.check`), and with `--labels`
the likely mislabelled images (`analysis.labels`)."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from headstart.cli.console import say
from headstart.cli.options import TABLE_OPTIONS, add_config_options, table_columns


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
    from headstart.analysis.check import CHECK_JSON, check_dataset, write_check_json
    from headstart.analysis.labels import LABEL_CSV, write_label_csv
    from headstart.io.outputs import claim

    if a.csv and not a.labels:
        raise ValueError("--csv writes the label check's ranking: add --labels")
    for path, kind in ((a.json, CHECK_JSON), (a.csv, LABEL_CSV)):
        if path:
            claim(path, kind, overwrite=a.overwrite)  # refused before the work, not after
    report = check_dataset(a.data, val_split=a.val_split, image_size=a.image_size, columns=table_columns(a))
    say(_format_check(report))
    rows = None
    if a.labels:
        from headstart.analysis.labels import find_label_issues

        rows = find_label_issues(a.data, arch=a.arch, val_split=a.val_split, columns=table_columns(a), workers=a.workers)
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


def add_check(sub: Any, full: bool) -> None:
    """`headstart check`'s parser (`full`: see build_parser)."""
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
    if full:
        add_config_options(p, TABLE_OPTIONS)
    p.set_defaults(func=cmd_check)
