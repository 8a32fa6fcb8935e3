"""Massive-activation rows: the policy that flags them and the readers that skip them.

A few rows (the first token of a context that starts mid-document acts as an attention sink) have
norms two orders of magnitude above the rest: measured on SmolLM2-135M, blocks.15.hook_resid_post,
up to ~23,000 against a median of ~170, 0.05% of the rows carrying 75% of the variance. Left in,
they dominate every mean-squared metric and pull training towards reconstructing them.

Policy: a row whose L2 norm exceeds `outlier_factor` (default 10) times the median norm of its
split is flagged. The flag is a keep-mask beside the rows (keep_*.npy, written by `write_masks` when
the cache writer closes, or later by cache.flag_outliers), so the row <-> text layout and resumable
writing stay as they are; meta.json["outliers"] records the factor and each split's median norm,
threshold and flagged count. Training draws batches from kept rows only, metrics and feature
statistics skip flagged rows (`kept_view`). A cache written before this policy has no masks and
reads as all rows kept (a reader never writes into a cache that other runs may be using);
`flag_outliers(path)` adds them in one pass over the shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from saeens.errors import SaeensError
from saeens.io.files import atomic_save_npy

# Flag rows above this multiple of their split's median norm. Measured (SmolLM2-135M layer 15, the
# experiments' cache): every other row stays within 1.8x the median, the attention-sink rows lie at
# 19x-135x, so 10 separates them with room on either side.
OUTLIER_FACTOR = 10.0


def _shard_norms(out: Path, entry: dict[str, Any], chunk_rows: int = 65536) -> np.ndarray:
    arr_ND = np.load(out / entry["acts"], mmap_mode="r")
    return np.concatenate([np.linalg.norm(np.asarray(arr_ND[lo : lo + chunk_rows], np.float32), axis=1)
                           for lo in range(0, max(arr_ND.shape[0], 1), chunk_rows)])


def check_factor(factor: float | None) -> None:
    """Refuse a factor that would flag ordinary rows before any work is done (None: no rule)."""
    if factor is not None and not factor > 1:
        raise SaeensError(f"--outlier-factor must be above 1 (a multiple of the median norm), got {factor}: use e.g. 10")


def write_masks(out: Path, shards: list[dict[str, Any]], factor: float) -> dict[str, Any]:
    """keep_*.npy for every shard (norm <= factor x its split's median norm) and the record for meta.json."""
    check_factor(factor)
    norms = [_shard_norms(out, s) for s in shards]
    record: dict[str, Any] = {"factor": float(factor), "rule": "norm > factor x the split's median norm", "splits": {}}
    for split in dict.fromkeys(s["split"] for s in shards):
        mine = [i for i, s in enumerate(shards) if s["split"] == split]
        median = float(np.median(np.concatenate([norms[i] for i in mine])))
        threshold = factor * median
        flagged = 0
        for i in mine:
            keep_N = norms[i] <= threshold
            flagged += int((~keep_N).sum())
            shards[i]["keep"] = f"keep_{i:05d}.npy"
            atomic_save_npy(out / shards[i]["keep"], keep_N)
        record["splits"][split] = {"median_norm": median, "threshold": threshold, "flagged": flagged,
                                   "rows": int(sum(shards[i]["rows"] for i in mine))}
    return record


class KeptRows:
    """The kept rows of a cache as a reader of their own (rows renumbered 0..n_kept-1), so training,
    metrics and feature statistics skip flagged rows without knowing about them; `original` maps
    indices back to the cache's rows (the row <-> text layout)."""

    def __init__(self, acts: Any):
        self.acts, self.d_in, self.meta, self.path = acts, acts.d_in, acts.meta, acts.path
        self._index: dict[str, np.ndarray] = {}

    def index(self, split: str) -> np.ndarray:
        if split not in self._index:
            self._index[split] = self.acts.kept_rows(split)
        return self._index[split]

    def original(self, idx_N: np.ndarray, split: str) -> np.ndarray:
        """Cache row of each kept-row index (-1 stays -1: an empty slot)."""
        idx_N = np.asarray(idx_N, np.int64)
        return np.where(idx_N < 0, -1, self.index(split)[np.maximum(idx_N, 0)])

    def n_rows(self, split: str = "train") -> int:
        return int(self.index(split).shape[0])

    def gather(self, idx_N: np.ndarray, split: str = "train") -> np.ndarray:
        return self.acts.gather(self.index(split)[np.asarray(idx_N, np.int64)], split)

    def chunks(self, split: str = "test", chunk_rows: int = 8192) -> Iterator[np.ndarray]:
        keep_N, lo = self.acts.keep(split), 0
        for x_ND in self.acts.chunks(split, chunk_rows):
            kept_ND = x_ND[keep_N[lo : lo + len(x_ND)]]
            lo += len(x_ND)
            if len(kept_ND):
                yield kept_ND


def kept_view(acts: Any) -> Any:
    """A cache's kept rows (KeptRows); any other reader (in-memory rows, a model stream, which
    applies the rule itself) as it is."""
    return KeptRows(acts) if hasattr(acts, "kept_rows") else acts
