"""PNG plots of results (matplotlib, headless Agg backend)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def metric_bars(rows: list[dict[str, Any]], metrics: list[str], out: Path, title: str = "") -> Path:
    """One small bar chart per metric, one bar per row (method)."""
    names = [str(r["method"]) for r in rows]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.2), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        vals = [float(r.get(m, float("nan"))) for r in rows]
        ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
        ax.set_title(m, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def training_curves(runs: dict[str, Path], out: Path, key: str = "mse") -> Path:
    """The logged training `key` (metrics.jsonl) against step, one line per run."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, run in runs.items():
        rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=name)
    ax.set_xlabel("step (boosting: all stages in sequence)")
    ax.set_ylabel(f"training {key} (normalised units)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
