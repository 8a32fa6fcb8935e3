"""Where training batches come from: the BatchSource protocol and its activation-cache implementation.

`fit` asks a source for batch `step` (a pure function of (seed, step), so a resumed run sees the
same data), for a fixed seeded sample (b_dec's geometric median, the input scale) and for a
description that the run directory records and checks on resume. Under a mesh each process asks
only for the rows its devices hold (`rows=`). A source may be a cache read by row index
(`CacheSource`) or a stream that computes activations on the fly; only the first can feed a
boosting run's residual cache (`RowSource`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from saeens.data.cache import batch_indices
from saeens.data.outliers import KeptRows, kept_view
from saeens.errors import SaeensError


@runtime_checkable
class BatchSource(Protocol):
    d_in: int

    def describe(self) -> dict[str, Any]:
        """What the run directory records and compares on resume (keys of saeens/runs.py's source)."""
        ...

    def init_sample(self, n: int, seed: int) -> np.ndarray:
        """A fixed, seeded float32 sample [<=n, d_in] (b_dec's geometric median, the norm scale)."""
        ...

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
        """Rows `rows` of global batch `step` (float32 [len, d_in]), a pure function of (seed, step),
        checked finite (a one-line SaeensError naming where a bad row came from)."""
        ...


class Activations(Protocol):
    """Rows by index: what ActivationCache and ArrayActivations offer and CacheSource wraps."""

    d_in: int

    def n_rows(self, split: str = "train") -> int: ...

    def gather(self, idx_N: np.ndarray, split: str = "train") -> np.ndarray: ...


@runtime_checkable
class RowSource(BatchSource, Protocol):
    """A source with random access to its training rows: a boosting run streams them once per
    stage into its residual cache and then reads that cache by the same batch indices."""

    n_train: int

    def rows(self, idx_N: np.ndarray) -> np.ndarray:
        """Training rows by index, checked finite."""
        ...


class CacheSource:
    """Batches of an activation cache (or in-memory rows): batch `step` holds the training rows
    `batch_indices(n_train, batch_size, seed, step)`, drawn epoch by epoch without replacement
    from the KEPT rows (flagged massive-activation rows are never trained on: data/outliers.py)."""

    def __init__(self, acts: Activations):
        if not getattr(acts, "meta", {}).get("complete", True):
            raise SaeensError("the activation cache is incomplete (its saeens cache run was cut short): re-run the same saeens cache command to finish it")
        self.acts = kept_view(acts)
        self.d_in = int(acts.d_in)
        self.n_train = int(self.acts.n_rows("train"))
        if self.n_train < 1:
            raise SaeensError("the activation cache has no training rows: rebuild it with more tokens")

    def describe(self) -> dict[str, Any]:
        """The cache's path (absolute; None for in-memory rows), d_in, training rows and, from its
        meta.json, model, hook, dataset and split seed."""
        meta = getattr(self.acts, "meta", None) or {}
        path = getattr(self.acts, "path", None)
        return {"path": str(Path(path).absolute()) if path is not None else None, "d_in": self.d_in,
                "train_rows": self.n_train, **{k: meta.get(k) for k in ("model", "hook", "dataset", "split_seed")}}

    def init_sample(self, n: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, 1 << 30])
        return self.rows(np.sort(rng.choice(self.n_train, size=min(self.n_train, n), replace=False)))

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
        return self.rows(batch_indices(self.n_train, batch_size, seed, step)[rows])

    def rows(self, idx_N: np.ndarray) -> np.ndarray:
        x_ND = self.acts.gather(idx_N, "train")
        if isinstance(self.acts, KeptRows):  # name the cache's own row, not the kept-row index
            check_rows(self.acts.acts, x_ND, self.acts.original(idx_N, "train"))
        else:
            check_rows(self.acts, x_ND, idx_N)
        return x_ND


def as_source(data: BatchSource | Activations) -> BatchSource:
    """A BatchSource as it is; rows by index (an ActivationCache, ArrayActivations) as a CacheSource."""
    return data if isinstance(data, BatchSource) else CacheSource(data)


def check_rows(acts: Activations, x_ND: np.ndarray, idx_N: np.ndarray) -> None:
    """NaN/Inf rows would poison the parameters silently: name the shard and row instead."""
    if np.isfinite(x_ND).all():
        return
    row = int(idx_N[np.argmin(np.isfinite(x_ND).all(axis=1))])
    where = f"training row {row}"
    if hasattr(acts, "shards"):
        shards = acts.shards("train")
        bounds = np.cumsum([0] + [sh["rows"] for sh in shards])
        i = int(np.searchsorted(bounds, row, side="right") - 1)
        where = f"shard {shards[i]['acts']} row {row - int(bounds[i])}"
    raise SaeensError(f"{where} holds NaN/Inf activations: recompute the cache (e.g. in float32) or drop that shard")
