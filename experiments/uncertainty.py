"""Uncertainty of compared numbers: bootstrap intervals over test documents, and the rule that turns
two intervals into a finding.

Seeds give a Student-t interval (saeens.metrics.mean_ci) for every metric averaged over independent
runs; SCR and probing accuracies come from ONE set of test documents, so their uncertainty is a
bootstrap over those documents (`bootstrap_ci`). A comparison is a finding only when the intervals
are disjoint; overlapping intervals are reported as "no difference" (`compare`), so a "flip" inside
the noise is never read as a result for or against the paper. Two methods probed on the same test
documents compare pairwise (`paired_accuracy_ci`: the difference's interval against zero).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

NO_DIFFERENCE = "no difference"


def bootstrap_ci(per_document: Sequence[float] | np.ndarray, stat: Callable[[np.ndarray], float] = np.mean,
                 n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """stat over the documents and its percentile interval from n_boot resamples of the documents
    (with replacement, seeded): e.g. per-document 0/1 correctness -> accuracy [low, high]."""
    v = np.asarray(per_document, np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    boots = np.array([stat(v[rng.integers(0, v.size, v.size)]) for _ in range(n_boot)])
    tail = 100 * (1 - confidence) / 2
    return {"mean": float(stat(v)), "ci_low": float(np.percentile(boots, tail)),
            "ci_high": float(np.percentile(boots, 100 - tail)), "n": int(v.size), "confidence": confidence}


def accuracy_ci(tasks: Sequence[tuple[float, int]], n_boot: int = 2000, confidence: float = 0.95,
                seed: int = 0, groups: Sequence[str] | None = None) -> dict[str, Any]:
    """The mean accuracy over tasks, each (accuracy, test documents), with a bootstrap over every
    task's test documents (a 0/1 correctness per document: its resamples depend only on the count
    of correct ones, so the accuracy and the count are enough). Tasks are resampled independently.
    groups: each task's group (e.g. its dataset); the statistic is then the mean over groups of each
    group's mean accuracy, so a group weighs the same however many tasks it has."""
    correct = [np.r_[np.ones(int(round(a * n))), np.zeros(n - int(round(a * n)))] for a, n in tasks]
    return _task_bootstrap(correct, groups, n_boot, confidence, seed)


def paired_accuracy_ci(correct_a: Sequence[Sequence[float]], correct_b: Sequence[Sequence[float]],
                       n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
                       groups: Sequence[str] | None = None) -> dict[str, Any]:
    """accuracy(a) - accuracy(b) over the SAME test documents (per task, each document's 0/1
    correctness for a and for b, resampled together; groups as in `accuracy_ci`): tighter than two
    separate intervals, the right test for two methods probed on one test set. compare(it, ZERO)
    is the verdict."""
    diffs = []
    for a, b in zip(correct_a, correct_b, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"paired scores need the same documents, got {a.shape} and {b.shape}")
        diffs.append(a - b)
    return _task_bootstrap(diffs, groups, n_boot, confidence, seed)


def _task_bootstrap(per_doc_T: list[np.ndarray], groups: Sequence[str] | None, n_boot: int, confidence: float,
                    seed: int) -> dict[str, Any]:
    """The mean over groups of each group's mean over its tasks of a per-document score's task mean,
    with each task's documents resampled independently n_boot times."""
    rng = np.random.default_rng(seed)
    g_T = np.zeros(len(per_doc_T), int) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    stat = lambda v_T: float(np.mean([v_T[g_T == i].mean() for i in range(g_T.max() + 1)]))  # noqa: E731
    boots = [stat(np.array([v[rng.integers(0, v.size, v.size)].mean() for v in per_doc_T])) for _ in range(n_boot)]
    tail = 100 * (1 - confidence) / 2
    return {"mean": stat(np.array([v.mean() for v in per_doc_T], np.float64)),
            "ci_low": float(np.percentile(boots, tail)), "ci_high": float(np.percentile(boots, 100 - tail)),
            "confidence": confidence}


ZERO = {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0}  # compare(difference interval, ZERO): its sign, or none


def compare(a: Mapping[str, float], b: Mapping[str, float]) -> str:
    """'higher', 'lower' (a against b) when the intervals [ci_low, ci_high] are disjoint, else
    NO_DIFFERENCE (also when either interval is missing or NaN: nothing can be claimed)."""
    lows = [x.get("ci_low") for x in (a, b)]
    highs = [x.get("ci_high") for x in (a, b)]
    if any(v is None or not np.isfinite(v) for v in (*lows, *highs)):
        return NO_DIFFERENCE
    if lows[0] > highs[1]:
        return "higher"
    if highs[0] < lows[1]:
        return "lower"
    return NO_DIFFERENCE


def best_of(rows: Mapping[str, Mapping[str, float]], higher_is_better: bool = True) -> str:
    """The name whose interval lies beyond every other's (the clear winner), else NO_DIFFERENCE."""
    want = "higher" if higher_is_better else "lower"
    for name, r in rows.items():
        if all(compare(r, other) == want for o, other in rows.items() if o != name):
            return name
    return NO_DIFFERENCE


def change(old: str, new: str) -> str:
    """How a comparison moved between budgets: 'persists', 'flips', 'appears', 'vanishes' or 'none'."""
    if old == new:
        return "persists" if old != NO_DIFFERENCE else "none"
    if NO_DIFFERENCE in (old, new):
        return "appears" if old == NO_DIFFERENCE else "vanishes"
    return "flips"
