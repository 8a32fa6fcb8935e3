"""The on-disk activation cache: meta.json + .npy shards that numpy.load(mmap_mode="r") reads.

Layout (a user-facing contract: other tools read these files directly):
  ACTS/meta.json            d_in, n_tokens, dtype, model, hook, context_length, shards, ...
  ACTS/acts_00000.npy       float32 [rows, d_in] activations
  ACTS/tokens_00000.npy     int32 [rows] token id that produced each row
  ACTS/keep_00000.npy       bool [rows] False for a massive-activation row (see below)
Each shard belongs to one split ("train" or "test"); corpora are split by document, so a shard
never mixes splits. Shards and meta.json are written atomically (temp file + rename), meta.json
from the moment the writer opens ("complete": false until close): a killed writer leaves every
listed shard complete, and `CacheWriter(..., resume=True)` continues such a cache. Readers gather rows from memory-mapped shards, so
the cache never has to fit in memory.

Massive-activation rows are flagged in keep_*.npy when the writer closes (the policy and its
readers: data/outliers.py); `flag_outliers` adds the masks to a cache written before it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from saeens.data.outliers import OUTLIER_FACTOR, check_factor, write_masks
from saeens.errors import SaeensError
from saeens.io.files import atomic_save_npy, atomic_write_text, read_json

FORMAT = "saeens-activations"
VERSION = 1
SPLITS = ("train", "test")


def check_finite(acts_ND: np.ndarray, where: str) -> None:
    """NaN/Inf activations poison training silently: name the first bad row instead."""
    finite_N = np.isfinite(acts_ND).all(axis=1)
    if not finite_N.all():
        row = int(np.argmin(finite_N))
        raise SaeensError(
            f"{where} row {row} holds NaN/Inf activations: drop those rows or recompute them (e.g. in float32)"
        )


class CacheWriter:
    """Appends shards to a cache directory; meta.json lists only finished shards.

    Rows wait in one preallocated [shard_rows, d_in] buffer per split (no concatenation at
    flush, no growth with n_tokens) until a shard is full, `flush(split)` or `close()`.
    meta.json is written (complete: false) as soon as the writer opens and rewritten atomically
    after every shard, so a killed writer leaves a consistent, resumable cache: `resume=True`
    reopens such a directory (an incomplete cache written by CacheWriter), drops stray *.tmp
    files and shard files meta.json does not list, and appends after the listed shards. Rows that
    were still in a buffer when the writer died are lost: the caller recomputes them.
    """

    def __init__(self, out: str | Path, d_in: int, meta: dict[str, Any] | None = None, shard_rows: int = 65536,
                 *, resume: bool = False):
        self.out = Path(out)
        self.d_in = int(d_in)
        self.shard_rows = int(shard_rows)
        if self.shard_rows < 1:
            raise SaeensError(f"shard_rows must be positive, got {shard_rows}")
        old = read_meta(self.out) if resume else None
        if old is not None:
            if old.get("complete"):
                raise SaeensError(f"{self.out} holds a complete cache: nothing to resume; choose a new --out to write another")
            if int(old["d_in"]) != self.d_in:
                raise SaeensError(f"{self.out} holds d_in={old['d_in']}, not {self.d_in}: choose a new --out")
            _drop_strays(self.out, old)
            self.meta: dict[str, Any] = {**old, **(meta or {}), "complete": False}
        else:
            if self.out.exists() and any(p.suffix != ".tmp" for p in self.out.iterdir()):
                raise SaeensError(f"output directory {self.out} is not empty: choose a new --out or delete it first")
            self.out.mkdir(parents=True, exist_ok=True)
            for p in self.out.glob("*.tmp"):  # only temp files of a writer killed before its first meta.json
                p.unlink()
            self.meta = {
                "format": FORMAT,
                "version": VERSION,
                "d_in": self.d_in,
                "dtype": "float32",
                "n_tokens": 0,
                "complete": False,
                "shards": [],
                **(meta or {}),
            }
        self._buf: dict[str, tuple[np.ndarray, np.ndarray] | None] = {s: None for s in SPLITS}
        self._fill: dict[str, int] = {s: 0 for s in SPLITS}
        self.write_meta()

    def write_meta(self) -> None:
        atomic_write_text(self.out / "meta.json", json.dumps(self.meta, indent=2))

    def rows(self, split: str) -> int:
        """Rows of `split` in finished shards (what a resumed run may skip)."""
        return sum(s["rows"] for s in self.meta["shards"] if s["split"] == split)

    def pending(self, split: str) -> int:
        """Rows of `split` added but not yet in a finished shard."""
        return self._fill[split]

    def add(self, acts_ND: np.ndarray, tokens_N: np.ndarray, split: str = "train") -> None:
        if split not in SPLITS:
            raise SaeensError(f"unknown split {split!r}: use 'train' or 'test'")
        acts_ND = np.asarray(acts_ND, np.float32)  # no copy when already float32
        if acts_ND.ndim != 2 or acts_ND.shape[1] != self.d_in:
            raise SaeensError(f"activations of shape {acts_ND.shape} do not match d_in={self.d_in}")
        tokens_N = np.asarray(tokens_N).reshape(-1)
        if tokens_N.shape[0] != acts_ND.shape[0]:
            raise SaeensError(f"{tokens_N.shape[0]} token ids for {acts_ND.shape[0]} activation rows")
        check_finite(acts_ND, f"activations being cached (shard {len(self.meta['shards'])})")
        lo, n = 0, acts_ND.shape[0]
        while lo < n:
            if self._buf[split] is None:  # allocated lazily, freed after each flush (untouched pages cost nothing)
                self._buf[split] = (np.empty((self.shard_rows, self.d_in), np.float32), np.empty(self.shard_rows, np.int32))
            buf_ND, tok_N = self._buf[split]
            fill = self._fill[split]
            take = min(n - lo, self.shard_rows - fill)
            buf_ND[fill : fill + take] = acts_ND[lo : lo + take]
            tok_N[fill : fill + take] = tokens_N[lo : lo + take]  # int32 in place
            self._fill[split] = fill + take
            lo += take
            if self._fill[split] == self.shard_rows:
                self._flush(split, self.shard_rows)

    def flush(self, split: str) -> None:
        """Write `split`'s buffered rows as a (possibly short) shard now, e.g. at the end of a split."""
        if self._fill[split]:
            self._flush(split, self._fill[split])

    def _flush(self, split: str, n: int) -> None:
        buf = self._buf[split]
        assert buf is not None and n == self._fill[split]
        i = len(self.meta["shards"])
        entry = {"acts": f"acts_{i:05d}.npy", "tokens": f"tokens_{i:05d}.npy", "rows": int(n), "split": split}
        atomic_save_npy(self.out / entry["tokens"], buf[1][:n])
        atomic_save_npy(self.out / entry["acts"], buf[0][:n])
        self._buf[split], self._fill[split] = None, 0  # give the buffer back to the OS
        self.meta["shards"].append(entry)
        self.meta["n_tokens"] += int(n)
        self.write_meta()

    def close(self, outlier_factor: float | None = OUTLIER_FACTOR) -> Path:
        """Flush, flag massive-activation rows (`flag_outliers`; None: no masks) and mark complete."""
        for split in SPLITS:
            self.flush(split)
        if self.meta["n_tokens"] == 0:
            raise SaeensError("no activations were written: the input is empty")
        if outlier_factor is not None:
            self.meta["outliers"] = write_masks(self.out, self.meta["shards"], outlier_factor)
        self.meta["complete"] = True
        self.write_meta()
        return self.out


def flag_outliers(path: str | Path, factor: float = OUTLIER_FACTOR) -> dict[str, Any]:
    """Add (or redo, with another factor) the keep-masks of a complete cache: one pass over its
    shards' norms; returns the meta.json record (factor, each split's median norm, threshold, flagged)."""
    path = Path(path)
    meta = read_meta(path)
    if meta is None or not meta.get("complete"):
        raise SaeensError(f"{path} holds no complete activation cache: finish it with the same `saeens cache` command first")
    meta["outliers"] = write_masks(path, meta["shards"], factor)
    atomic_write_text(path / "meta.json", json.dumps(meta, indent=2))
    return meta["outliers"]


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """meta.json of a saeens cache directory, or None if there is none (or only temp files)."""
    f = Path(path) / "meta.json"
    if not f.is_file():
        return None
    meta = read_json(f, "activation cache file", f"delete {Path(path)} and re-run `saeens cache`")
    if meta.get("format") != FORMAT or "shards" not in meta:
        raise SaeensError(f"{f} is not a saeens activation cache: choose a new --out")
    return meta


def _drop_strays(out: Path, meta: dict[str, Any]) -> None:
    """Temp files and shard files that meta.json does not list: leftovers of a killed writer."""
    listed = {s[k] for s in meta["shards"] for k in ("acts", "tokens", "keep") if k in s}
    for p in out.iterdir():
        stray_shard = p.suffix == ".npy" and p.name.startswith(("acts_", "tokens_", "keep_")) and p.name not in listed
        if p.is_file() and (p.suffix == ".tmp" or stray_shard):
            p.unlink()


def cache_from_array(
    acts_ND: np.ndarray, out: str | Path, test_fraction: float = 0.1, meta: dict[str, Any] | None = None,
    shard_rows: int = 65536, outlier_factor: float | None = OUTLIER_FACTOR,
) -> Path:
    """Any [n, d_in] array -> a cache; the last test_fraction of rows become the test split."""
    check_factor(outlier_factor)
    acts_ND = np.asarray(acts_ND)
    if acts_ND.ndim != 2 or acts_ND.shape[0] < 2:
        raise SaeensError(f"expected an [n, d_in] array with n >= 2, got shape {acts_ND.shape}")
    if not 0 <= test_fraction < 1:
        raise SaeensError(f"test fraction must lie in [0, 1), got {test_fraction}")
    check_finite(acts_ND, "input array")
    n = acts_ND.shape[0]
    n_test = int(round(n * test_fraction))
    info = {"model": None, "hook": None, "context_length": None, "layout": "rows of an array", **(meta or {})}
    writer = CacheWriter(out, acts_ND.shape[1], info, shard_rows)
    tokens_N = np.full(n, -1, np.int32)  # no tokens behind a raw array
    for lo in range(0, n - n_test, shard_rows):
        hi = min(lo + shard_rows, n - n_test)
        writer.add(acts_ND[lo:hi], tokens_N[lo:hi], "train")
    if n_test:
        writer.add(acts_ND[n - n_test :], tokens_N[n - n_test :], "test")
    return writer.close(outlier_factor)


class ActivationCache:
    """Read-only view of a cache directory: validated shards, row gathers, streaming chunks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise SaeensError(
                f"{self.path} is not an activation cache (no meta.json): create one with `saeens cache`"
            )
        self.meta = read_json(meta_path, "activation cache file", "re-run `saeens cache` to rewrite the cache")
        if self.meta.get("format") != FORMAT or "shards" not in self.meta:
            raise SaeensError(f"{meta_path} is not a saeens activation cache: create one with `saeens cache`")
        self.d_in = int(self.meta["d_in"])
        self._shards = [s for s in self.meta["shards"]]
        for s in self._shards:
            self._open(s["acts"])  # validates every listed shard up front

    @lru_cache(maxsize=None)  # noqa: B019 - one memmap per shard for the life of the cache
    def _open(self, name: str) -> np.ndarray:
        f = self.path / name
        if not f.is_file():
            raise SaeensError(f"shard {f} is missing: restore it or re-run `saeens cache`")
        try:
            arr = np.load(f, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise SaeensError(f"shard {f} is truncated or corrupt ({e}): re-run `saeens cache`") from None
        entry = next(s for s in self._shards if s["acts"] == name)
        if arr.ndim != 2 or arr.shape != (entry["rows"], self.d_in):
            raise SaeensError(
                f"shard {f} has shape {arr.shape}, meta.json says ({entry['rows']}, {self.d_in}): re-run `saeens cache`"
            )
        return arr

    def shards(self, split: str) -> list[dict[str, Any]]:
        if split not in (*SPLITS, "all"):
            raise SaeensError(f"unknown split {split!r}: use train, test or all")
        return [s for s in self._shards if split == "all" or s["split"] == split]

    def n_rows(self, split: str = "train") -> int:
        return sum(s["rows"] for s in self.shards(split))

    def gather(self, idx_N: np.ndarray, split: str = "train") -> np.ndarray:
        """Rows by index into the split's concatenated rows (any order, repeats allowed)."""
        shards = self.shards(split)
        bounds = np.cumsum([0] + [s["rows"] for s in shards])
        idx_N = np.asarray(idx_N, np.int64)
        out_ND = np.empty((idx_N.shape[0], self.d_in), np.float32)
        which_N = np.searchsorted(bounds, idx_N, side="right") - 1
        for si in np.unique(which_N):
            sel = np.nonzero(which_N == si)[0]
            local = idx_N[sel] - bounds[si]
            order = np.argsort(local)  # sorted reads are sequential on disk
            out_ND[sel[order]] = self._open(shards[si]["acts"])[local[order]]
        return out_ND

    def chunks(self, split: str = "test", chunk_rows: int = 8192) -> Iterator[np.ndarray]:
        """Stream a split in order, chunk by chunk: one pass, bounded memory."""
        for s in self.shards(split):
            arr = self._open(s["acts"])
            for lo in range(0, arr.shape[0], chunk_rows):
                yield np.asarray(arr[lo : lo + chunk_rows], np.float32)

    def tokens(self, split: str = "all") -> np.ndarray:
        return np.concatenate([np.load(self.path / s["tokens"]) for s in self.shards(split)])

    def keep(self, split: str = "train") -> np.ndarray:
        """bool [n_rows(split)]: False for a flagged massive-activation row (all True without masks)."""
        parts = [self.shard_keep(s) for s in self.shards(split)]
        return np.concatenate(parts) if parts else np.ones(0, bool)

    def shard_keep(self, entry: dict[str, Any]) -> np.ndarray:
        """The keep-mask of one shard (all True when the cache has none)."""
        if "keep" not in entry:
            return np.ones(entry["rows"], bool)
        f = self.path / entry["keep"]
        try:
            keep_N = np.load(f)
        except (ValueError, OSError):
            keep_N = None
        if keep_N is None or keep_N.shape != (entry["rows"],):
            raise SaeensError(f"keep-mask {f} is missing or damaged: run saeens.data.flag_outliers on {self.path} to rewrite it")
        return keep_N

    def kept_rows(self, split: str = "train") -> np.ndarray:
        """int64 indices (into the split's rows) of the rows that are not flagged, in order."""
        return np.flatnonzero(self.keep(split))


def batch_indices(n_rows: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The rows of training batch `step`: a pure function of (seed, step), so resumed runs see the
    same data. Rows are drawn epoch by epoch from a seeded permutation (without replacement)."""
    pos_B = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch_B, within_B = np.divmod(pos_B, n_rows)
    out_B = np.empty(batch_size, np.int64)
    for epoch in np.unique(epoch_B):
        sel = epoch_B == epoch
        out_B[sel] = _permutation(n_rows, seed, int(epoch))[within_B[sel]]
    return out_B


@lru_cache(maxsize=2)
def _permutation(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


class ArrayActivations:
    """An in-memory [n, d_in] array with the reader interface training uses (train split = all
    rows but the last test_fraction, like `cache_from_array`)."""

    def __init__(self, acts_ND: np.ndarray, test_fraction: float = 0.0):
        self.acts_ND = np.asarray(acts_ND, np.float32)
        check_finite(self.acts_ND, "input array")
        self.d_in = self.acts_ND.shape[1]
        self._n_train = self.acts_ND.shape[0] - int(round(self.acts_ND.shape[0] * test_fraction))

    def _rows(self, split: str) -> np.ndarray:
        return {"train": self.acts_ND[: self._n_train], "test": self.acts_ND[self._n_train :], "all": self.acts_ND}[split]

    def n_rows(self, split: str = "train") -> int:
        return self._rows(split).shape[0]

    def gather(self, idx_N: np.ndarray, split: str = "train") -> np.ndarray:
        return self._rows(split)[idx_N]

    def chunks(self, split: str = "test", chunk_rows: int = 8192) -> Iterator[np.ndarray]:
        rows = self._rows(split)
        for lo in range(0, rows.shape[0], chunk_rows):
            yield rows[lo : lo + chunk_rows]
