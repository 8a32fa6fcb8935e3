"""PNG plots of results (matplotlib, headless Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402



def _save(fig, out: Path, title: str = "") -> Path:
    """Title, layout, write the PNG and free the figure (pyplot keeps every open figure alive)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

def metric_bars(rows: list[dict[str, Any]], metrics: list[str], out: Path, title: str = "") -> Path:
    """One small bar chart per metric, one bar per row (method)."""
    names = [str(r["method"]) for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [float(r.get(m, float("nan"))) for r in rows]
        ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(m, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    return _save(fig, out, title)


def training_curves(runs: dict[str, Path], out: Path, key: str = "mse") -> Path:
    """The logged training `key` (metrics.jsonl) against step, one line per run."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (name, run) in enumerate(runs.items()):
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line]
        # dashes keep curves that coincide visible (boosting's first stage IS the single SAE)
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name, linestyle=("-", "--", "-.", ":")[i % 4])
    ax.set_xlabel("step (boosting: all stages in sequence)")
    ax.set_ylabel(f"training {key} (normalised units)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    return _save(fig, out)


def _mean_err(row: dict[str, Any], key: str) -> tuple[float, float]:
    """(mean, 95% CI half-width) of row[key]: a {"mean", "ci_low", "ci_high"} dict, or a float with
    optional row[key + "_ci_low"/"_ci_high"]; NaN when missing."""
    v = row.get(key, float("nan"))
    if isinstance(v, dict):
        mean, lo, hi = v.get("mean", float("nan")), v.get("ci_low", float("nan")), v.get("ci_high", float("nan"))
    else:
        mean, lo, hi = float(v), row.get(f"{key}_ci_low", float("nan")), row.get(f"{key}_ci_high", float("nan"))
    err = (hi - lo) / 2 if lo == lo and hi == hi else 0.0
    return float(mean), float(err)


def grouped_bars(rows: list[dict[str, Any]], metrics: list[str], out: Path, group: str = "arch",
                 bar: str = "method", title: str = "") -> Path:
    """One panel per metric; bars grouped by row[group] (e.g. architecture), one colour per row[bar]
    (e.g. method), with 95% CI error bars where the rows carry them (see _mean_err)."""
    import numpy as np

    groups = list(dict.fromkeys(str(r[group]) for r in rows))
    bars = list(dict.fromkeys(str(r[bar]) for r in rows))
    width = 0.8 / max(1, len(bars))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for bi, b in enumerate(bars):
            vals, errs = [], []
            for g in groups:
                r = next((r for r in rows if str(r[group]) == g and str(r[bar]) == b), None)
                mean, err = _mean_err(r, m) if r is not None else (float("nan"), 0.0)
                vals.append(mean)
                errs.append(err)
            ax.bar(np.arange(len(groups)) + bi * width, vals, width, yerr=errs, label=b, color=f"C{bi}", capsize=2)
        ax.set_xticks(np.arange(len(groups)) + width * (len(bars) - 1) / 2, groups, fontsize=8)
        ax.set_title(m, fontsize=9)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out, title)


def curves_with_bands(series: dict[str, dict[str, dict[str, list[float]]]], metrics: list[str], out: Path,
                      xlabel: str = "J", title: str = "", xscale: str = "linear", ncols: int = 4,
                      hlines: dict[str, dict[str, float]] | None = None) -> Path:
    """One panel per metric, one line per series with a shaded 95% confidence band.

    series[name][metric] = {"x": [...], "mean": [...], "ci_low": [...], "ci_high": [...]} (bounds may
    be NaN or missing: no band). hlines[name][metric]: a dashed reference level (e.g. a baseline)."""
    import numpy as np

    n = len(metrics)
    cols = min(ncols, n)
    rows_ = -(-n // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.4 * cols, 2.9 * rows_), squeeze=False)
    for i, m in enumerate(metrics):
        ax = axes[i // cols][i % cols]
        for si, (name, by_metric) in enumerate(series.items()):
            c = by_metric.get(m)
            if not c:
                continue
            x, mean = np.asarray(c["x"], float), np.asarray(c["mean"], float)
            ax.plot(x, mean, "o-", ms=3, color=f"C{si}", label=name)
            lo, hi = np.asarray(c.get("ci_low", [np.nan] * len(x)), float), np.asarray(c.get("ci_high", [np.nan] * len(x)), float)
            ok = np.isfinite(lo) & np.isfinite(hi)
            if ok.any():
                ax.fill_between(x[ok], lo[ok], hi[ok], color=f"C{si}", alpha=0.2, linewidth=0)
        for hi_, (name, levels) in enumerate((hlines or {}).items()):
            if m in levels and levels[m] == levels[m]:
                ax.axhline(levels[m], color=f"C{len(series) + hi_}", ls="--", lw=1, label=name)
        ax.set_xscale(xscale)
        if xscale == "linear":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(m, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.tick_params(labelsize=7)
    for j in range(n, rows_ * cols):
        axes[j // cols][j % cols].axis("off")
    axes[0][0].legend(fontsize=7)
    return _save(fig, out, title)


def pareto(points: dict[str, list[dict[str, Any]]], pairs: list[tuple[str, str]], out: Path, title: str = "",
           label: str = "k") -> Path:
    """Sparsity-fidelity fronts: one panel per (x, y) pair of keys, one line per method through its
    points (sorted by x), each point annotated with point[label]; log-scale x."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.6), squeeze=False)
    for ax, (xk, yk) in zip(axes[0], pairs):
        for si, (name, pts) in enumerate(points.items()):
            pts = sorted(pts, key=lambda p: p[xk])
            ax.plot([p[xk] for p in pts], [p[yk] for p in pts], "o-", ms=4, color=f"C{si}", label=name)
            for p in pts:
                ax.annotate(str(p.get(label, "")), (p[xk], p[yk]), fontsize=6, xytext=(2, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel(xk, fontsize=8)
        ax.set_ylabel(yk, fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out, title)
