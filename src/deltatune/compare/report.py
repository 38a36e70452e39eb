"""A comparison's outputs in its output_dir: results.csv and results.md (one row per method: trainable
parameters and share, the metric's mean and spread over seeds, time, peak memory, delta file size),
runs.csv (every run, sweeps included), metric_vs_share.png (metric against trainable share on a log
axis) and curves.png (each method's training loss, first seed)."""
from __future__ import annotations

import csv
import io
import json
import statistics
import warnings
from pathlib import Path

from ..core.io import atomic_write
from ..extras import MissingExtraError, require

COLUMNS = ("method", "lr", "seeds", "mean", "sd", "validation_mean", "trainable", "percent", "train_seconds",
           "peak_rss_mb", "delta_mb")
RUN_COLUMNS = ("method", "seed", "lr", "validation", "test", "trainable", "percent", "train_seconds",
               "wall_seconds", "peak_rss_mb", "delta_bytes", "folder")


def summary_rows(records: list) -> list:
    """One row per method, in the order the records come: the test metric's mean and sample standard
    deviation over seeds (sd 0 for one seed), the others averaged (peak memory: the largest)."""
    by_method: dict = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    rows = []
    for method, rs in by_method.items():
        tests = [r["test"] for r in rs if r["test"] is not None]
        vals = [r["validation"] for r in rs if r["validation"] is not None]
        peaks = [r["peak_rss_mb"] for r in rs if r.get("peak_rss_mb") is not None]
        sizes = [r["delta_bytes"] for r in rs if r.get("delta_bytes") is not None]
        rows.append({
            "method": method, "lr": rs[0]["lr"], "seeds": len(rs),
            "mean": statistics.fmean(tests) if tests else None,
            "sd": statistics.stdev(tests) if len(tests) > 1 else (0.0 if tests else None),
            "validation_mean": statistics.fmean(vals) if vals else None,
            "trainable": rs[0]["trainable"], "percent": rs[0]["percent"],
            "train_seconds": statistics.fmean(r["train_seconds"] for r in rs) if all(
                r["train_seconds"] is not None for r in rs) else None,
            "peak_rss_mb": max(peaks) if peaks else None,
            "delta_mb": max(sizes) / 2**20 if sizes else None})
    return rows


def write_report(comp, records: list, every: list, log=print) -> tuple[list, list]:
    """records: the runs the table summarises (each method at its chosen rate); every: all finished runs."""
    out = comp.output_dir
    rows = summary_rows(records)
    files = [_write(out / "results.csv", _csv(rows, COLUMNS)), _write(out / "results.md", markdown(comp, rows)),
             _write(out / "runs.csv", _csv(every, RUN_COLUMNS)),
             _write(out / "results.json", json.dumps(rows, indent=2))]
    files += [p for p in (_plot_share(comp, rows, out / "metric_vs_share.png"),
                          _plot_curves(records, out / "curves.png")) if p is not None]
    log(markdown(comp, rows))
    log(f"written: {', '.join(str(f) for f in files)}")
    return rows, [str(f) for f in files]


def markdown(comp, rows: list) -> str:
    m = comp.metric
    head = (f"| method | lr | seeds | test {m} (mean ± sd) | validation {m} | trainable | share % | train s "
            "| peak RSS MB | delta file MB |")
    lines = [head, "|" + "---|" * 10]
    swept = {m.name: m.lrs for m in comp.methods if m.lrs}
    for r in rows:
        lr = _num(r["lr"], "g") + (f" (best on validation of {', '.join(f'{x:g}' for x in swept[r['method']])})"
                                   if r["method"] in swept else "")
        lines.append(f"| {r['method']} | {lr} | {r['seeds']} | {_num(r['mean'], '.4f')}"
                     f"{' ± ' + _num(r['sd'], '.4f') if r['seeds'] > 1 and r['sd'] is not None else ''} | "
                     f"{_num(r['validation_mean'], '.4f')} | {_num(r['trainable'], ',')} | {_num(r['percent'], '.3f')}"
                     f" | {_num(r['train_seconds'], '.1f')} | {_num(r['peak_rss_mb'], '.0f')} | "
                     f"{_num(r['delta_mb'], '.2f')} |")
    return "\n".join(lines) + "\n"


def _num(v, fmt) -> str:
    return "n/a" if v is None else format(v, fmt)


def _csv(rows: list, columns) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _write(path: Path, text: str) -> Path:
    atomic_write(path, lambda t: Path(t).write_text(text))
    return path


def _figure(what: str):
    try:  # matplotlib.figure, not pyplot: the caller's backend is left alone
        return require("matplotlib.figure", "plots", what, package="matplotlib").Figure
    except MissingExtraError as e:
        warnings.warn(f"{e} (the comparison writes its tables without plots).")
        return None


def _plot_share(comp, rows: list, path: Path) -> Path | None:
    pts = [r for r in rows if r["mean"] is not None and r["percent"]]
    Figure = _figure("Drawing the comparison's plots") if pts else None
    if Figure is None:
        return None
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.subplots()
    for r in pts:
        ax.errorbar(r["percent"], r["mean"], yerr=r["sd"] or 0.0, fmt="o", capsize=3)
        ax.annotate(r["method"], (r["percent"], r["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set(xscale="log", xlabel="trainable parameters (% of the model, log scale)", ylabel=f"test {comp.metric}",
           title=f"test {comp.metric} (mean ± sd over seeds) against trainable share")
    ax.grid(True, which="both", alpha=0.3)
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=100))
    return path


def _plot_curves(records: list, path: Path) -> Path | None:
    curves = {}
    for r in records:  # each method's first run listed (its first seed)
        log = Path(r["folder"]) / "metrics.jsonl"
        if r["method"] in curves or not log.is_file():
            continue
        steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        curves[r["method"]] = [(s["step"], s["loss"]) for s in steps if "loss" in s and "step" in s]
    curves = {k: v for k, v in curves.items() if v}
    Figure = _figure("Drawing the comparison's plots") if curves else None
    if Figure is None:
        return None
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    for method, pts in curves.items():
        ax.plot(*zip(*pts), lw=1, label=method)
    ax.set(xlabel="optimizer step", ylabel="training loss", title="training loss (first seed)")
    ax.legend(fontsize=8)
    atomic_write(path, lambda t: fig.savefig(t, format="png", dpi=100))
    return path
