"""PNG plots of results (matplotlib, headless Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402



# metric key -> (panel title, y-axis label, which way is better); keys not listed show as they are
LABELS = {
    "explained_variance": ("Explained variance", "fraction of the variance", "higher is better"),
    "explained_variance_per_token": ("Explained variance per token", "mean over tokens", "higher is better"),
    "fvu": ("Fraction of variance unexplained", "fraction of the variance", "lower is better"),
    "mse": ("Reconstruction MSE", "squared error per token", "lower is better"),
    "l0": ("L0: active latents per token", "latents", "lower is sparser"),
    "dead_fraction": ("Dead latents", "fraction of the latents", "lower is better"),
    "diversity": ("Diversity: features unlike all others", "features (cosine < 0.7 to every other)", "higher is better"),
    "delta_lm_loss": ("LM loss increase when spliced", "nats per token", "lower is better"),
    "loss_recovered": ("LM loss recovered", "fraction (1 = clean model)", "higher is better"),
    "kl_div": ("KL(clean || spliced)", "nats per token", "lower is better"),
    "stability": ("Stability across seeds", "mean max cosine", "higher is better"),
    "connectivity": ("Connectivity", "fraction of latent pairs co-firing", "lower is better"),
}


def _labels(metric: str) -> tuple[str, str, str]:
    return LABELS.get(metric, (metric, "", ""))


def _title(metric: str) -> str:
    """Panel title: the metric's name and, on a second line, which way is better."""
    title, _, better = _labels(metric)
    return f"{title}\n({better})" if better else title


def _save(fig, out: Path, title: str = "") -> Path:
    """Title, layout, write the PNG and free the figure (pyplot keeps every open figure alive)."""
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def metric_bars(rows: list[dict[str, Any]], metrics: list[str], out: Path, title: str = "") -> Path:
    """One bar chart per metric, one bar per row (method), each bar labelled with its value."""
    names = [str(r["method"]) for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [float(r.get(m, float("nan"))) for r in rows]
        bars = ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}" for v in vals], fontsize=7)
        ax.margins(y=0.15)  # room for the value labels
        ax.set_title(_title(m), fontsize=9)
        ax.set_ylabel(_labels(m)[1], fontsize=8)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.tick_params(axis="y", labelsize=7)
    return _save(fig, out, title)


def training_curves(runs: dict[str, Path], out: Path, reference: dict[str, float] | None = None,
                    title: str = "") -> Path:
    """The logged training MSE of each run in its own panel, in activation units.

    Every metrics.jsonl row is the mean over the steps since the previous row, so it is drawn as a
    flat segment over exactly that window (a short last window shows as a short segment, not as a
    point). The log is in the run's scaled units: dividing by input_scale**2 (ensemble.json) gives
    activation units, the unit of `saeens evaluate`'s mse; reference[name] (e.g. that held-out mse)
    is drawn as a dotted line. Boosting rows carry their stage: boundaries are marked.
    """
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(3.3 * len(runs), 3.4), squeeze=False, sharey=True)
    units = set()
    for i, (ax, (name, run)) in enumerate(zip(axes[0], runs.items())):
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]
        meta_path = Path(run) / "ensemble.json"
        scale = json.loads(meta_path.read_text()).get("input_scale") if meta_path.is_file() else None
        units.add("activation units" if scale else "scaled training units")
        edges = np.array([0] + [r["step"] for r in rows], float)
        mse = np.array([r["mse"] for r in rows]) / (scale or 1.0) ** 2
        ax.stairs(mse, edges, baseline=None, color=f"C{i}", linewidth=1.4, label="training (window means)")
        stages = [r["stage"] for r in rows if "stage" in r]
        for j in range(1, len(stages)):
            if stages[j] != stages[j - 1]:
                ax.axvline(edges[j], color="0.6", linestyle="--", linewidth=0.8)
        if len(set(stages)) > 1:
            ax.text(0.02, 0.02, f"dashed: stage boundaries ({len(set(stages))} stages)", transform=ax.transAxes, fontsize=7)
        if reference and name in reference:
            ax.axhline(reference[name], color="k", linestyle=":", linewidth=1.2, label="held-out (table)")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_yscale("log")
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel(f"MSE per token ({' / '.join(sorted(units))})", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="best")
    return _save(fig, out, title or "Training MSE (lower is better)")


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
                 bar: str = "method", title: str = "", marks: dict[str, str] | None = None) -> Path:
    """One panel per metric; bars grouped by row[group] (e.g. architecture), one colour per row[bar]
    (e.g. method), with 95% CI error bars where the rows carry them (see _mean_err). marks[metric]:
    a row key whose value is drawn as a black tick across that row's bar (e.g. stability's chance
    level, which differs by method), named in the panel's legend."""
    import numpy as np

    groups = list(dict.fromkeys(str(r[group]) for r in rows))
    bars = list(dict.fromkeys(str(r[bar]) for r in rows))
    width = 0.8 / max(1, len(bars))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        ticks = []
        for bi, b in enumerate(bars):
            vals, errs = [], []
            for g in groups:
                r = next((r for r in rows if str(r[group]) == g and str(r[bar]) == b), None)
                mean, err = _mean_err(r, m) if r is not None else (float("nan"), 0.0)
                vals.append(mean)
                errs.append(err)
            x = np.arange(len(groups)) + bi * width
            ax.bar(x, vals, width, yerr=errs, label=b, color=f"C{bi}", capsize=2)
            if marks and m in marks:
                levels = [next((float(r.get(marks[m], np.nan)) for r in rows if str(r[group]) == g and str(r[bar]) == b),
                               np.nan) for g in groups]
                ticks.append(ax.hlines(levels, x - width / 2, x + width / 2, colors="k", linewidth=1.5,
                                       label=marks[m].replace("_", " ")))
        if ticks:
            ax.legend(handles=ticks[:1], fontsize=7)
        ax.set_xticks(np.arange(len(groups)) + width * (len(bars) - 1) / 2, groups, fontsize=8)
        ax.set_title(_title(m), fontsize=9)
    axes[0][0].legend(fontsize=7)
    return _save(fig, out, title)


def curves_with_bands(series: dict[str, dict[str, dict[str, list[float]]]], metrics: list[str], out: Path,
                      xlabel: str = "J", title: str = "", xscale: str = "linear", ncols: int = 4,
                      hlines: dict[str, dict[str, float]] | None = None) -> Path:
    """One panel per metric, one line per series with a shaded 95% confidence band.

    series[name][metric] = {"x": [...], "mean": [...], "ci_low": [...], "ci_high": [...]} (bounds may
    be NaN or missing: no band; an optional "chance": [...] is drawn dashed in the series' colour).
    hlines[name][metric]: a dashed reference level (e.g. a baseline)."""
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
            if "chance" in c:  # e.g. stability's: random unit vectors of the same counts, in its own legend
                ax.plot(x, np.asarray(c["chance"], float), "--", lw=1, color=f"C{si}", label=f"{name} chance")
        for hi_, (name, levels) in enumerate((hlines or {}).items()):
            if m in levels and levels[m] == levels[m]:
                ax.axhline(levels[m], color=f"C{len(series) + hi_}", ls="--", lw=1, label=name)
        if any("chance" in (by_metric.get(m) or {}) for by_metric in series.values()):
            ax.legend(fontsize=7)  # a panel with chance lines says which is which
        ax.set_xscale(xscale)
        if xscale == "linear":
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(_title(m), fontsize=9)
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
