"""Stability across independently trained runs, and the checks that make it mean something.

Stability asks whether runs that differ ONLY in their seed find the same features. Comparing a run
with itself, two runs with one seed, or runs of other shapes, methods or caches gives a number that
answers another question, so those are refused before any decoder is loaded. With few runs the
Student-t interval can leave the metric's range (R = 2 has one degree of freedom) or not exist (one
Hungarian pair): the bounds are clipped to the range, or left NaN, and a note in the result says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from saeens import ensemble, metrics
from saeens.errors import SaeensError
from saeens.io.files import read_json

MAX_HUNGARIAN = 8192  # features per run above which the exact one-to-one matching is skipped
RANGES = {"stability": (0.0, 1.0), "hungarian_stability": (-1.0, 1.0)}  # stability floors cosines at 0
SHAPE_KEYS = ("arch", "width", "d_in")


def run_identity(run: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What a run was trained as: seed, method, members, SAE shape and activation source.

    From its ensemble.json (meta); runs written before it recorded seed and source fall back to
    RUN/config.json (train.seed) and RUN/activations.json (the cache).
    """
    run = Path(run)
    config = _optional_json(run / "config.json")
    seed = meta.get("seed", config.get("train", {}).get("seed"))
    if seed is None:
        raise SaeensError(f"{run} records no seed (ensemble.json and config.json lack it): retrain it with saeens train")
    source = meta.get("source") or _optional_json(run / "activations.json")
    sae = meta.get("sae", {})
    return {
        "run": str(run),
        "resolved": os.path.realpath(run),
        "seed": int(seed),
        "method": meta.get("method"),
        "members": meta.get("members"),
        **{k: sae.get(k) for k in SHAPE_KEYS},
        "cache": _cache_of(source),
    }


def check_comparable(idents: list[dict[str, Any]]) -> None:
    """Refuse (one line) runs that do not differ only by their seed."""
    if len(idents) < 2:
        raise SaeensError("stability needs at least two runs trained with different seeds: pass two or more run directories")
    first = idents[0]
    seen: dict[str, str] = {}
    seeds: dict[int, str] = {}
    for idt in idents:
        if idt["resolved"] in seen:
            raise SaeensError(f"{idt['run']} is given twice (also as {seen[idt['resolved']]}): pass each run once")
        seen[idt["resolved"]] = idt["run"]
        if idt["seed"] in seeds:
            raise SaeensError(
                f"{seeds[idt['seed']]} and {idt['run']} were both trained with seed {idt['seed']}: "
                "stability compares independent runs, train one with another --seed"
            )
        seeds[idt["seed"]] = idt["run"]
    for idt in idents[1:]:
        for key, what in (("method", "method"), ("members", "members"), *((k, k) for k in SHAPE_KEYS)):
            if idt[key] != first[key]:
                raise SaeensError(
                    f"{first['run']} has {what} {first[key]} but {idt['run']} has {what} {idt[key]}: "
                    "compare runs that differ only in --seed"
                )
        if idt["cache"] != first["cache"]:
            raise SaeensError(
                f"{first['run']} was trained on {_describe(first['cache'])} but {idt['run']} on "
                f"{_describe(idt['cache'])}: compare runs trained on the same activation cache"
            )


def stability_of_runs(runs: list[str | Path]) -> dict[str, Any]:
    """Mean-max-cosine stability (and the Hungarian variant) of R runs that differ only by seed, each
    beside its chance level (random unit vectors of the same counts, seed 0) and its ratio over it;
    for ensembles also stability_per_member (boosting: per stage), whose chance level is the run's."""
    from saeens.train import load_ensemble

    loaded = [load_ensemble(r) for r in runs]  # a directory that holds no finished run says so here
    idents = [run_identity(r, meta) for r, (_, meta) in zip(runs, loaded)]
    check_comparable(idents)
    decoders = [np.asarray(ensemble.decoder(ens)) for ens, _ in loaded]
    first = idents[0]
    out: dict[str, Any] = {
        "runs": [str(r) for r in runs],
        "method": first["method"], "arch": first["arch"], "members": first["members"], "width": first["width"],
        "seeds": [idt["seed"] for idt in idents],
        "features_per_run": [int(d.shape[0]) for d in decoders],
    }
    results = [("stability", metrics.stability(decoders, members=first["members"] or 1))]
    if max(d.shape[0] for d in decoders) <= MAX_HUNGARIAN:  # an F x F float64 matrix per pair, O(F^3)
        results.append(("hungarian_stability", metrics.hungarian_stability(decoders)))
    chance = metrics.stability_chance(out["features_per_run"], decoders[0].shape[1], hungarian=len(results) > 1)
    notes = []
    for name, result in results:
        low, high, note = bounded_ci(name, result["ci_low"], result["ci_high"], len(result["scores"]))
        out[name] = result["mean"]
        out[f"{name}_chance"] = chance[name]
        out[f"{name}_over_chance"] = metrics.over_chance(result["mean"], chance[name])
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
        out[f"{name}_scores"] = result["scores"]
        if note:
            notes.append(note)
    if "per_member" in results[0][1]:  # each member's (boosting: stage's) features alone; chance: the run's
        out["stability_per_member"] = results[0][1]["per_member"]
    out["ci_note"] = " ".join(notes) or None
    return out


def bounded_ci(name: str, low: float, high: float, n_scores: int) -> tuple[float, float, str | None]:
    """The t interval clipped to the metric's range, with a note when clipping (or no interval) happened."""
    lo_range, hi_range = RANGES[name]
    if not (np.isfinite(low) and np.isfinite(high)):
        return float("nan"), float("nan"), (
            f"{name}: {n_scores} score(s) give no interval (NaN, null in JSON): train more runs for one."
        )
    basis = f"the 95% t interval [{low:.3f}, {high:.3f}] from {n_scores} scores ({n_scores - 1} degree(s) of freedom)"
    if low < lo_range or high > hi_range:
        return max(low, lo_range), min(high, hi_range), (
            f"{name}: {basis} leaves the metric's range and is clipped to [{lo_range:g}, {hi_range:g}]: "
            "train more runs for a tighter one."
        )
    if n_scores == 2:  # t = 12.7 with one degree of freedom: the interval says little
        return low, high, f"{name}: {basis} is wide by construction: train more runs for a tighter one."
    return low, high, None


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path, "run file", "restore it or retrain the run") if path.is_file() else {}


def _cache_of(source: dict[str, Any]) -> tuple[str, int] | None:
    """(normalised cache path, training rows), or None when the run records no source."""
    if not source or "path" not in source:
        return None
    return os.path.normpath(str(source["path"])), source.get("train_rows")


def _describe(cache: tuple[str, int] | None) -> str:
    return "an unrecorded cache" if cache is None else f"{cache[0]} ({cache[1]} training rows)"
