"""Run reports a person can read at a glance: report.md, a self-contained report.html and PNG plots.

The report is built from a plain summary dict (written by ``hrank run`` as summary.json), so it can be
regenerated at any time with ``hrank report RUN_DIR``.
"""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hrank.errors import HRankError
from hrank.flops import format_count
from hrank.io import atomic_save_with, atomic_write_text, is_json_number, read_json

STAGE_COLUMNS = [  # (key, header, formatter); accuracies are percentages, as hrank.train.evaluate returns
    ("macs", "MACs", lambda v: format_count(v)),
    ("params", "params", lambda v: format_count(v)),
    ("val_top1", "val top-1", lambda v: f"{v:.2f}%"),
    ("test_top1", "test top-1", lambda v: f"{v:.2f}%"),
    ("test_top5", "test top-5", lambda v: f"{v:.2f}%"),
    ("lossless_top1", "lossless-1k top-1", lambda v: f"{v:.2f}%"),
    ("latency_b1_ms", "latency b=1", lambda v: f"{v:.2f} ms"),
    ("latency_batch_ms", "latency batch", lambda v: f"{v:.1f} ms"),
    ("size_bytes", "size", lambda v: f"{v / 2**20:.2f} MiB"),
]


def _fmt(value: Any, formatter) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    return formatter(value)


def _stage_rows(stages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    cols = [c for c in STAGE_COLUMNS if any(s.get(c[0]) is not None for s in stages)]
    headers = ["model"] + [c[1] for c in cols]
    rows = [[s["name"]] + [_fmt(s.get(k), f) for k, _, f in cols] for s in stages]
    return headers, rows


def _layer_rows(layers: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    headers = ["#", "layer", "channels before", "after", "removed", "mean rank (kept)", "mean rank (removed)"]
    rows = []
    for i, layer in enumerate(layers, start=1):
        rows.append([str(i), layer["name"], str(layer["before"]), str(layer["after"]),
                     str(layer["before"] - layer["after"]),
                     _fmt(layer.get("mean_rank_kept"), lambda v: f"{v:.2f}"),
                     _fmt(layer.get("mean_rank_removed"), lambda v: f"{v:.2f}")])
    return headers, rows


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------------------- plots

def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    return plt


def _ticks(n: int) -> list[int]:
    step = 1 if n <= 20 else 5 if n <= 80 else 10
    return [i for i in range(1, n + 1) if i == 1 or i % step == 0]


def plot_ranks(layers: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "",
               score_label: str = "filter score (mean feature-map rank)") -> Path | None:
    """Box plot of per-filter scores for every pruned layer, kept filters as dots, removed as crosses."""
    plt = _pyplot()
    scored = [layer for layer in layers if layer.get("scores") is not None]
    if plt is None or not scored:
        return None
    n = len(scored)
    fig, ax = plt.subplots(figsize=(max(7.0, min(16.0, 0.22 * n + 3)), 4.2))
    data = [np.asarray(layer["scores"], dtype=float) for layer in scored]
    ax.boxplot(data, positions=range(1, n + 1), widths=0.6, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": "0.45"}, whiskerprops={"color": "0.45"},
               capprops={"color": "0.45"})
    rng = np.random.default_rng(0)
    for i, (layer, scores) in enumerate(zip(scored, data, strict=True), start=1):
        kept = np.zeros(len(scores), bool)
        if layer.get("kept") is not None:
            kept[np.asarray(layer["kept"], dtype=int)] = True
        else:
            kept[:] = True
        jitter = rng.uniform(-0.18, 0.18, len(scores))
        ax.scatter(i + jitter[kept], scores[kept], s=5, color="tab:blue", alpha=0.55, linewidths=0,
                   label="kept" if i == 1 else None)
        ax.scatter(i + jitter[~kept], scores[~kept], s=9, color="tab:red", marker="x", alpha=0.8,
                   linewidths=0.8, label="removed" if i == 1 else None)
    ticks = _ticks(n)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlim(0.3, n + 0.7)
    ax.set_xlabel("pruned layer (# in the per-layer table)")
    ax.set_ylabel(score_label)
    ax.set_title(title or "Filter scores per layer")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, markerscale=2)
    return _save(fig, plt, path)


def plot_widths(layers: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path | None:
    """Stacked bars per layer: channels kept and channels removed."""
    plt = _pyplot()
    if plt is None or not layers:
        return None
    n = len(layers)
    x = np.arange(1, n + 1)
    after = np.array([layer["after"] for layer in layers])
    removed = np.array([layer["before"] - layer["after"] for layer in layers])
    fig, ax = plt.subplots(figsize=(max(7.0, min(16.0, 0.22 * n + 3)), 3.8))
    ax.bar(x, after, color="tab:blue", width=0.8, label="kept")
    ax.bar(x, removed, bottom=after, color="tab:red", alpha=0.35, width=0.8, label="removed")
    ticks = _ticks(n)
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlim(0.3, n + 0.7)
    ax.set_xlabel("layer (# in the per-layer table)")
    ax.set_ylabel("output channels")
    ax.set_title(title or "Channels kept and removed per layer")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", frameon=False)
    return _save(fig, plt, path)


def plot_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> Path | None:
    """Training curves: loss (left) and accuracy (right) per epoch."""
    plt = _pyplot()
    records = [r for r in records if "epoch" in r]
    if plt is None or not records:
        return None
    epochs = [r["epoch"] for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label, style in (("train_loss", "train", "-"), ("val_loss", "validation", "--")):
        ys = [r.get(key) for r in records]
        if any(y is not None for y in ys):
            ax1.plot(epochs, ys, style, marker="o", ms=3, label=label)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.set_title("Loss")
    for key, label, style in (("train_top1", "train", "-"), ("val_top1", "validation", "--")):
        ys = [r.get(key) for r in records]
        if any(y is not None for y in ys):
            ax2.plot(epochs, ys, style, marker="o", ms=3, label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("top-1 accuracy (%)")
    ax2.set_title("Accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(frameon=False)
        if len(epochs) <= 20:
            ax.set_xticks(epochs)
    if title:
        fig.suptitle(title)
    return _save(fig, plt, path)


def _save(fig, plt, path: str | os.PathLike) -> Path:
    fig.tight_layout()
    atomic_save_with(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------- report

def write_report(run_dir: str | os.PathLike, summary: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write report.md, report.html (plots embedded) and the PNG plots into ``run_dir``."""
    run_dir = Path(run_dir)
    title = summary.get("title", "hrank report")
    layers = summary.get("layers", [])
    plots: list[tuple[str, Path]] = []
    for fname, fn, caption in (("ranks.png", plot_ranks, "Filter scores per layer"),
                               ("widths.png", plot_widths, "Channels kept and removed per layer"),
                               ("curves.png", plot_curves, "Fine-tuning curves")):
        arg = summary.get("curves", []) if fn is plot_curves else layers
        path = fn(arg, run_dir / fname)
        if path is not None:
            plots.append((caption, path))

    stage_headers, stage_rows = _stage_rows(summary.get("stages", []))
    layer_headers, layer_rows = _layer_rows(layers)
    facts = summary.get("facts", {})

    md = [f"# {title}", ""]
    if summary.get("headline"):
        md += [summary["headline"], ""]
    if facts:
        md += [f"- **{k}**: {v}" for k, v in facts.items()] + [""]
    md += ["## Models", "", markdown_table(stage_headers, stage_rows), ""]
    for note in summary.get("notes", []):
        md += [f"> {note}", ""]
    for caption, path in plots:
        md += [f"## {caption}", "", f"![{caption}]({path.name})", ""]
    if layers:
        md += ["## Per-layer widths", "", markdown_table(layer_headers, layer_rows), ""]
    md_path = atomic_write_text(run_dir / "report.md", "\n".join(md))

    css = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
           "table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;"
           "padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
           "th{background:#f3f3f3}img{max-width:100%}blockquote{color:#555;border-left:3px solid #ccc;"
           "margin:0;padding-left:1em}")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{css}</style></head><body><h1>{html.escape(title)}</h1>"]
    if summary.get("headline"):
        parts.append(f"<p><b>{html.escape(summary['headline'])}</b></p>")
    if facts:
        parts.append("<ul>" + "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>"
                                      for k, v in facts.items()) + "</ul>")
    parts += ["<h2>Models</h2>", _html_table(stage_headers, stage_rows)]
    parts += [f"<blockquote>{html.escape(n)}</blockquote>" for n in summary.get("notes", [])]
    for caption, path in plots:
        data = base64.b64encode(path.read_bytes()).decode()
        parts.append(f"<h2>{html.escape(caption)}</h2><img alt='{html.escape(caption)}' "
                     f"src='data:image/png;base64,{data}'>")
    if layers:
        parts += ["<h2>Per-layer widths</h2>", _html_table(layer_headers, layer_rows)]
    parts.append("</body></html>")
    html_path = atomic_write_text(run_dir / "report.html", "\n".join(parts))
    return md_path, html_path


def _numbers(values: Any) -> bool:
    return isinstance(values, list) and all(is_json_number(v) for v in values)


def _summary_problem(summary: Any) -> str | None:
    """What makes ``summary`` unusable for :func:`write_report` (None when it is a run summary's shape)."""
    if not isinstance(summary, dict):
        return f"it holds {type(summary).__name__}, expected a mapping"
    for key in ("title", "stages"):
        if key not in summary:
            return f"no {key!r}"
    for key, kind in (("title", str), ("headline", str), ("facts", dict), ("stages", list), ("layers", list),
                      ("curves", list), ("notes", list)):
        if key in summary and not isinstance(summary[key], kind):
            return f"{key!r} is {type(summary[key]).__name__}, expected {kind.__name__}"
    if not summary["stages"]:
        return "'stages' is empty"
    for i, stage in enumerate(summary["stages"]):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            return f"stages[{i}] is not a mapping with a name"
        bad = [k for k, _, _ in STAGE_COLUMNS if stage.get(k) is not None and not is_json_number(stage[k])]
        if bad:
            return f"stages[{i}].{bad[0]} is not a number"
    for i, layer in enumerate(summary.get("layers", [])):
        if not isinstance(layer, dict) or not isinstance(layer.get("name"), str):
            return f"layers[{i}] is not a mapping with a name"
        before, after = layer.get("before"), layer.get("after")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (before, after)):
            return f"layers[{i}] has no channel counts 'before' and 'after'"
        for key in ("mean_rank_kept", "mean_rank_removed"):
            if layer.get(key) is not None and not is_json_number(layer[key]):
                return f"layers[{i}].{key} is not a number"
        scores, kept = layer.get("scores"), layer.get("kept")
        if scores is not None and not _numbers(scores):
            return f"layers[{i}].scores is not a list of numbers"
        n = len(scores) if scores is not None else before
        if kept is not None and not (isinstance(kept, list) and all(isinstance(k, int) and not isinstance(k, bool)
                                                                    and 0 <= k < n for k in kept)):
            return f"layers[{i}].kept is not a list of channel indices below {n}"
    for i, row in enumerate(summary.get("curves", [])):
        if not isinstance(row, dict) or not all(v is None or is_json_number(v) for k, v in row.items()
                                                if k in ("epoch", "train_loss", "val_loss", "train_top1",
                                                         "val_top1")):
            return f"curves[{i}] is not a mapping of numbers"
    if not all(isinstance(n, str) for n in summary.get("notes", [])):
        return "'notes' is not a list of strings"
    return None


def load_summary(run_dir: str | os.PathLike) -> dict:
    """Read ``summary.json`` from a run directory; a file that is not JSON or not a run summary is an HRankError."""
    path = Path(run_dir) / "summary.json"
    summary = read_json(path, "run summary")
    problem = _summary_problem(summary)
    if problem is not None:
        raise HRankError(f"{path} is not a summary written by hrank run: {problem}")
    return summary


def rebuild_report(run_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Rewrite the report of the hrank run directory ``run_dir`` from its summary.json; refuses other folders,
    and a directory a running ``hrank run`` holds (its lock), whose summary may be rewritten meanwhile."""
    from hrank.io import OutputLock
    from hrank.run import read_run_config

    run_dir = Path(run_dir)
    read_run_config(run_dir)  # only a run directory's own report is rewritten
    if not (run_dir / "summary.json").is_file():
        raise HRankError(f"{run_dir} holds no finished run (no summary.json)")
    with OutputLock(run_dir):
        return write_report(run_dir, load_summary(run_dir))
