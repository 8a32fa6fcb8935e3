"""Evaluate finished runs: one streaming pass over a cache split, dictionary metrics, tables."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from saeens import ensemble, metrics
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError

MAX_COFIRE = 16384
MAX_HUNGARIAN = 8192  # features per run above which the exact one-to-one matching is skipped


def evaluate_ensemble(ens: Ensemble, acts, split: str = "test", progress: bool = False) -> dict[str, float]:
    """Every activation metric in one pass over the split, plus diversity of the dictionary."""
    if acts.d_in != ens.cfg.d_in:
        raise SaeensError(f"the run expects d_in={ens.cfg.d_in} but the activations have d_in={acts.d_in}: use the run's cache")
    if acts.n_rows(split) == 0:
        raise SaeensError(f"the activation cache has no {split!r} rows: pass --split train or rebuild the cache")
    forward = partial(ensemble.forward, ens)
    # the co-firing matrix for connectivity is F x F booleans: skipped (NaN) past MAX_COFIRE features
    out = metrics.evaluate_stream(
        forward, acts.chunks(split), ens.width, cofire=ens.width <= MAX_COFIRE, progress=progress
    )
    out["diversity"] = int(metrics.diversity(ensemble.decoder(ens)))
    out["n_features"] = ens.width
    return out


def evaluate_run(run: str | Path, acts, split: str = "test", progress: bool = False) -> dict[str, Any]:
    from saeens.train import load_ensemble

    ens, meta = load_ensemble(run)
    return {"method": meta["method"], "members": meta["members"], "arch": ens.cfg.arch,
            **evaluate_ensemble(ens, acts, split, progress)}


def stability_of_runs(runs: list[str | Path]) -> dict[str, Any]:
    """Mean-max-cosine stability (and the Hungarian variant) of R independently trained runs."""
    from saeens.train import load_ensemble

    if len(runs) < 2:
        raise SaeensError("stability needs at least two runs trained with different seeds")
    decoders = [np.asarray(ensemble.decoder(load_ensemble(r)[0])) for r in runs]
    if len({d.shape[1] for d in decoders}) != 1:
        raise SaeensError("the runs have different d_in: compare runs trained on the same activations")
    out: dict[str, Any] = {"runs": [str(r) for r in runs], "features_per_run": [int(d.shape[0]) for d in decoders]}
    results = [("stability", metrics.stability(decoders))]
    if max(d.shape[0] for d in decoders) <= MAX_HUNGARIAN:  # an F x F float64 matrix per pair, O(F^3)
        results.append(("hungarian_stability", metrics.hungarian_stability(decoders)))
    for name, result in results:
        out[name] = result["mean"]
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = result["ci_low"], result["ci_high"]
        out[f"{name}_scores"] = result["scores"]
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table (readable in a terminal too) of rows with the same keys."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(keys), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def print_table(rows: list[dict[str, Any]]) -> None:
    print(format_table(rows))
