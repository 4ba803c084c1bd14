"""The levers of a faster default, each measured on the whole panel before it becomes one.

    python bench/levers.py --variant "name=--strategy gradual --backbone-lr 1" [--variant ...] \
        [--datasets hymenoptera,flowers12,solar] [--json FILE]
    python bench/levers.py --table-from FILE   # the tables of an earlier run

Each variant is `headstart train DATA --patience off` with its flags, run as a user runs it (the whole
command, cold feature and graph caches, as bench/time_to_accuracy.py), on each dataset of the panel
(time_to_accuracy.PANEL). Printed per dataset and variant: every epoch's validation accuracy, loss
and the seconds since the start, the best epoch, and the wall time of the whole command; so that
early stopping rules can be weighed on the same trajectories (`--patience off` trains every epoch).
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
from pathlib import Path

from _common import ROOT, cpu_line, machine, table
from time_to_accuracy import PANEL, headstart_run, panel_dataset

from headstart.data import scan_dataset
from headstart.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS")
    ap.add_argument("--datasets", default=",".join(PANEL))
    ap.add_argument("--json", default=None, metavar="FILE", help="every measurement (written after each run)")
    ap.add_argument("--table-from", default=None, metavar="FILE")
    args = ap.parse_args()
    if args.table_from:
        return summarize(json.loads(Path(args.table_from).read_text()))
    print(f"machine: {machine()}")
    print(cpu_line())
    create_model("resnet50", weights="imagenet")  # fetched and converted outside the timings
    results: dict = {"cpu": cpu_line(), "runs": []}
    for name in args.datasets.split(","):
        data = panel_dataset(name)
        n_val = len(scan_dataset(data).val)
        for variant in args.variant:
            label, flags = variant.split("=", 1)
            with tempfile.TemporaryDirectory() as tmp:
                r = headstart_run(ROOT, data, Path(tmp), ["--patience", "off", *shlex.split(flags)])
            results["runs"].append({"dataset": name, "n_val": n_val, "variant": label, "flags": flags, **r})
            print(f"  {name} {label}: {r['wall']:.1f}s, best {r['acc']:.4f} (epoch {r['best_epoch']}); "
                  f"{r['history']}", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))
    summarize(results)


def summarize(results: dict) -> None:
    print(results["cpu"])
    for name in dict.fromkeys(r["dataset"] for r in results["runs"]):
        rows = []
        for r in (r for r in results["runs"] if r["dataset"] == name):
            epochs = " ".join(f"{e}:{a:.4f}/{loss:.3f}@{t:.0f}" for e, a, loss, t in r["history"])
            rows.append([r["variant"], f"{r['acc']:.4f} (ep {r['best_epoch']})", f"{r['wall']:.0f}", epochs])
        print(f"\n{name} (epoch:val acc/val loss@seconds since the start)")
        print(table(rows, ["variant", "best val acc", "wall s", "epochs"]))


if __name__ == "__main__":
    main()
