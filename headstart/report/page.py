"""The run report: one self-contained HTML file (pictures embedded) that opens with no server.

Rendered from the files a run folder already holds (summary.json, metrics.csv, the PNGs,
predictions.csv), so `headstart report RUN` can re-render it at any time; with several runs it
compares them side by side.
"""

from __future__ import annotations

import base64
import csv
import html
import os
from pathlib import Path
from typing import Any, Sequence

from headstart.io import outputs
from headstart.io.runfolder import read_summary
from headstart.runtime.clock import Estimate
from headstart.version import __version__

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;color:#1d2330;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #dde;padding-bottom:4px}
.sub{color:#667} table{border-collapse:collapse;margin:8px 0} td,th{border:1px solid #dde;padding:3px 9px;text-align:right}
th{background:#f4f5f9} td.l,th.l{text-align:left} img{max-width:100%;border:1px solid #eee}
.cards{display:flex;gap:12px;flex-wrap:wrap}.card{border:1px solid #dde;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px} .grid{display:grid;gap:16px} .warn{color:#a33}
"""

# Runs after load: marks the page so a headless browser can tell that every image decoded.
_CHECK = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (i) { return i.complete && i.naturalWidth > 0; });
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-images-ok', String(ok));
});
</script>
"""


def _img(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="sub">({_text(path.name)} not found)</p>'
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_text(alt)}" src="data:image/png;base64,{data}">'


def _text(value: Any) -> str:
    """HTML-escaped text; the bytes of a file name that is not valid UTF-8 shown as \\xNN."""
    return html.escape(str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        cls = ' class="l"' if i < left else ""
        return f"<{tag}{cls}>{_text(v)}</{tag}>"
    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _confusion(classes: list[str], cm: list[list[int]]) -> str:
    peak = max([max(r) for r in cm] + [1])
    rows = []
    for name, row in zip(classes, cm):
        cells = []
        for j, v in enumerate(row):
            shade = int(235 - 150 * v / peak)
            colour = f"rgb({shade},{shade + 10 if shade < 245 else 245},255)" if j == classes.index(name) \
                else f"rgb(255,{shade},{shade})" if v else "#fff"
            cells.append(f'<td style="background:{colour}">{v}</td>')
        rows.append(f'<tr><th class="l">{_text(name)}</th>{"".join(cells)}</tr>')
    head = "".join(f"<th>{_text(c)}</th>" for c in classes)
    return f'<table><tr><th class="l">true \\ predicted</th>{head}</tr>{"".join(rows)}</table>'


def _cards(s: dict[str, Any]) -> str:
    m = s["best_metrics"]
    loss = "val loss, before T" if s.get("calibration") else "val loss"  # (evaluate's is at T)
    items = [("best val accuracy", f"{m['accuracy']:.4f}"), ("balanced accuracy", f"{m['balanced_accuracy']:.4f}"),
             (loss, f"{m['loss']:.4f}"), ("best epoch", f"{s['best_epoch']} / {s['config']['epochs']}"),
             ("wall time", f"{s['wall_time_s']:.1f} s")]
    if s.get("estimate"):
        items.append(("estimated", Estimate.from_dict(s["estimate"]).short()))
    return '<div class="cards">' + "".join(f'<div class="card">{k}<b>{v}</b></div>' for k, v in items) + "</div>"


def _dataset(s: dict[str, Any]) -> str:
    counts, classes = s["counts"], s["classes"]
    splits = list(counts)
    rows = [[c, *[counts[sp].get(c, 0) for sp in splits]] for c in classes]
    rows.append(["total", *[sum(counts[sp].values()) for sp in splits]])
    out = _table(["class", *splits], rows)
    for sp in splits:
        n = [v for v in counts[sp].values() if v]
        if len(n) > 1:
            out += f'<p class="sub">{sp}: largest / smallest class = {max(n) / min(n):.2f}</p>'
    skipped = s.get("skipped_files") or {}
    if skipped:
        out += f'<p class="warn">{len(skipped)} file(s) skipped (cannot be decoded):</p>'
        out += _table(["file", "reason"], [[p, r] for p, r in skipped.items()], left=2)
    else:
        out += '<p class="sub">No file was skipped.</p>'
    out += ('<p class="sub">Duplicates, leakage between splits, placeholders and odd modes: '
            '<code>headstart check DATA</code>.</p>')
    return out


def _per_class(s: dict[str, Any]) -> str:
    m = s["best_metrics"]
    rows = [[c["name"], f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", c["support"]]
            for c in m["per_class"]]
    return _table(["class", "precision", "recall", "F1", "support"], rows) + _confusion(s["classes"], m["confusion"])


def _timing(s: dict[str, Any]) -> str:
    rows = [[h["epoch"], f"{h['train_loss']:.4f}", f"{h['val_loss']:.4f}", f"{h['val_acc']:.4f}",
             f"{h['val_balanced_acc']:.4f}", f"{h['epoch_time']:.1f}", f"{h['step_time']:.3f}",
             f"{h['images_per_s']:.1f}", f"{h['data_wait']:.0%}"] for h in s["history"]]
    return _table(["epoch", "train loss", "val loss", "val acc", "balanced acc", "epoch s", "s/step", "img/s",
                   "data wait"], rows)


def _plan(s: dict[str, Any]) -> str:
    """What `auto` chose and why, with the candidates it timed; the estimate said before training."""
    parts = []
    plan = s.get("plan")
    if plan:
        rows = [[c["train_from"], f"{c['step_seconds']:.3f}", f"{c['epoch_seconds']:.1f}"] for c in plan["candidates"]]
        parts.append(f"<p>Trained from <b>{_text(plan['train_from'])}</b> for {plan['epochs']} epochs: "
                     f"{_text(plan['reason'])}.</p>")
        if rows:
            parts.append(_table(["train from", "s/step (timed)", "s an epoch (estimated)"], rows))
    if s.get("estimate"):
        est = Estimate.from_dict(s["estimate"])
        last = s["history"][-1]["epoch"] if s.get("history") else 0
        likely = est.stops_early and last <= est.likely_epochs  # judged against where it stopped
        judged = est.likely_s if likely else est.total_s
        off = s["wall_time_s"] / judged - 1 if judged else 0.0
        stop = (f" to a stop after epoch {est.likely_epochs} (--patience {est.patience}), "
                f"{est.total_s:.1f} s at most" if est.stops_early else "")
        parts.append(f"<p class='sub'>Estimated after {est.measured_steps} steps: "
                     f"{est.likely_s if est.stops_early else est.total_s:.1f} s{stop} "
                     f"({est.epochs} epochs x {est.steps_per_epoch} steps at {est.step_s:.3f} s/step, "
                     f"validations of about {est.validation_s:.1f} s); took {s['wall_time_s']:.1f} s ({off:+.0%}).</p>")
    return "".join(parts)


def _config(s: dict[str, Any]) -> str:
    rows = [[k, v] for k, v in s["config"].items()] + [["runtime", s.get("runtime", "")], ["data", s["data"]]]
    return _table(["option", "value"], rows, left=2)


def _top_losses_note(run: Path) -> str:
    path = run / "predictions.csv"
    if not path.is_file():
        return ""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        wrong = [r for r in csv.DictReader(f) if r["true"] != r["predicted"]]
    wrong.sort(key=lambda r: -float(r["loss"]))
    rows = [[r["path"], r["true"], r["predicted"], f"{float(r['probability']):.3f}", f"{float(r['loss']):.3f}"]
            for r in wrong[:12]]
    if not rows:
        return '<p class="sub">Every validation image is classified correctly.</p>'
    return _table(["file", "true", "predicted", "p(predicted)", "loss"], rows, left=3)


def _labels(s: dict[str, Any], folder: Path) -> str:
    found = s.get("label_issues")
    if not found:
        return ("<p class='sub'>The label check runs on the pretrained backbone's features, which this strategy "
                f"did not compute: <code>headstart check {_text(str(s['data']))} --labels</code> runs it.</p>")
    rows = [[r["path"], r["given"], r["suggested"], f"{r['quality']:.3f}"] for r in found["top"]]
    note = (f"<p class='sub'>{found['suspects']} of {found['checked']} training images: another class is "
            "confidently more likely by a linear head on the backbone's features that never saw the image "
            "(label quality: its probability of the given label). Every image: label_issues.csv.</p>")
    table = _table(["file", "given", "suggested", "label quality"], rows, left=3) if rows else ""
    return _img(folder / "label_issues.png", "likely mislabelled training images") + note + table


def _confidence(s: dict[str, Any], folder: Path) -> str:
    cal, unknown = s.get("calibration"), s.get("unknown")
    if not cal:
        return ("<p class='sub'>Not fitted: the run has no validation images, or was written by a headstart "
                "from before temperature scaling.</p>")
    held_out = "" if cal.get("ece_held_out") is None else (
        f", {cal['ece_held_out']:.4f} with T fitted on one half of them and judged on the other (the mean of "
        f"{cal['halvings']} random halvings: what new images see)")
    fitted = cal.get("fitted", cal["temperature"])
    kept = ("best.safetensors keeps T: predict, evaluate, serve and export apply it." if cal.get("kept", True) else
            "It did not lower the held-out error, so it is not kept: predictions use the raw logits (T = 1).")
    note = (f"<p class='sub'>Temperature scaling: every logit divided by T = {fitted:.3f}, fitted on the "
            f"{cal['val_images']} validation images (accuracy unchanged); expected calibration error on them "
            f"({cal['bins']} bins) {cal['ece_before']:.4f} before, {cal['ece_after']:.4f} after (in-sample: T fitted "
            f"on the same images){held_out}. {kept}</p>")
    if unknown:
        note += (f"<p class='sub'>None of these: <code>predict</code> calls an image <b>unknown</b> when its "
                 f"familiarity (how its nearest-training-image similarity and its logits' energy rank among the "
                 f"validation images') is under {unknown['threshold']:g}; that rejects "
                 f"{unknown['false_rejection']:.1%} of the validation images (<code>--reject off|auto|VALUE</code>). "
                 f"Reference: the features of {unknown['reference_images']} training images.</p>")
    return _img(folder / "reliability.png", "reliability diagram before and after temperature scaling") + note


def render_report(run: str | os.PathLike[str]) -> str:
    """The HTML of one run's report."""
    s = read_summary(run)
    folder = s["_folder"]
    cfg = s["config"]
    title = f"{folder.name}: {cfg['arch']} {cfg['strategy']} on {Path(s['data']).name}"
    parts = [
        f"<h1>{_text(title)}</h1><p class='sub'>{_text(str(s['data']))} &middot; "
        f"{_text(s.get('runtime', ''))}</p>", _cards(s),
        "<h2>Dataset</h2>", _dataset(s),
        "<h2>Curves</h2>", _img(folder / "curves.png", "loss and accuracy per epoch"),
        "<h2>Per-class metrics and confusion matrix (best epoch)</h2>", _per_class(s),
        "<h2>Most confidently wrong (top losses)</h2>", _img(folder / "top_losses.png", "top losses"),
        _top_losses_note(folder),
        *(["<h2>Top losses and their nearest training images</h2>",
            _img(folder / "top_losses_nearest.png", "top losses beside their nearest training images")]
          if (folder / "top_losses_nearest.png").is_file() else []),
        "<h2>Likely mislabelled training images</h2>", _labels(s, folder),
        "<h2>Confidence and unknown images</h2>", _confidence(s, folder),
        "<h2>Predictions (blue right, red wrong)</h2>", _img(folder / "predictions.png", "prediction grid"),
        "<h2>Timing</h2>", _plan(s), _timing(s),
        "<h2>Configuration</h2>", _config(s),
    ]
    return _page(title, "".join(parts))


def render_comparison(runs: Sequence[str | os.PathLike[str]]) -> str:
    """The HTML comparing runs side by side: a table of headline figures, then curves and
    confusion matrices in columns."""
    summaries = [read_summary(r) for r in runs]
    rows = []
    for s in summaries:
        m, h = s["best_metrics"], s["history"]
        rows.append([s["_folder"].name, s["config"]["arch"], s["config"]["strategy"], f"{m['accuracy']:.4f}",
                     f"{m['balanced_accuracy']:.4f}", f"{m['loss']:.4f}", s["best_epoch"],
                     f"{s['wall_time_s']:.1f}", f"{sum(x['images_per_s'] for x in h) / max(len(h), 1):.1f}"])
    table = _table(["run", "arch", "strategy", "best val acc", "balanced acc", "val loss", "best epoch",
                    "wall time s", "mean train img/s"], rows, left=3)
    cols = f"grid-template-columns:repeat({len(summaries)},1fr)"
    columns = "".join(
        f"<div><h2>{_text(s['_folder'].name)}</h2>{_img(s['_folder'] / 'curves.png', 'curves')}"
        f"{_per_class(s)}{_img(s['_folder'] / 'predictions.png', 'predictions')}</div>" for s in summaries)
    return _page("run comparison", f"<h1>Run comparison</h1>{table}<div class='grid' style='{cols}'>{columns}</div>")


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f'<meta name="generator" content="{outputs.GENERATOR} {__version__}"><title>{_text(title)}</title>'
            f"<style>{_CSS}</style></head><body>{body}{_CHECK}</body></html>")


def write_report(runs: Sequence[str | os.PathLike[str]], *, out: str | os.PathLike[str] | None = None,
                 overwrite: bool = False) -> Path:
    """Write one run's report (default: RUN/report.html) or a comparison of several (default:
    compare.html in the current folder). `out` replaces only a report (outputs.claim), unless
    `overwrite`."""
    if not runs:
        raise ValueError("pass at least one run folder")
    path = Path(out) if out else Path(runs[0]) / "report.html" if len(runs) == 1 else Path("compare.html")
    outputs.claim(path, outputs.REPORT, overwrite=overwrite)
    text = render_report(runs[0]) if len(runs) == 1 else render_comparison(runs)
    with outputs.write_output(path, outputs.REPORT, mode="w", overwrite=overwrite) as f:
        f.write(text)
    return path
