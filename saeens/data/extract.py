"""Token contexts -> model activations at one hook -> rows of an activation cache (cache.py).

The model is any `acts_fn(tokens_BT int32) -> acts_BTD` (a truncated, jitted transformer; a fake
one in tests); `model_acts_fn` builds it from saeens.models. Contexts stream through in batches
and rows go straight to `CacheWriter` shards, so peak memory is one batch + one shard, whatever
n_tokens is. Building a whole cache from a corpus (split, packing, resume) is data/build.py's.

Layout recorded in meta.json (bos_dropped = true): each context of length T gives T-1 rows, its
BOS position 0 is dropped (its norm is a huge outlier). Row r of a split's concatenated rows is
context r // (T-1), position 1 + r % (T-1); its token id is in the tokens_*.npy shards, and
contexts_<split>.npy (int32 [n_contexts, 2]) gives for each context (document index, token offset
within that document of position 1), indices into documents_<split>.json (doc_id, label in packing
order). Document separators (BOS, see tokens.py) inside a context are kept as rows.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saeens.data.cache import CacheWriter
from saeens.data.corpora import Document
from saeens.data.tokens import PackedContexts
from saeens.errors import SaeensError
from saeens.io.files import atomic_save_npy, atomic_write_text

ActsFn = Callable[[np.ndarray], Any]  # int32 [B, T] -> float [B, T, D] (numpy or jax array)
LAYOUT = "row r of a split = context r // (context_length - 1), position 1 + r % (context_length - 1); BOS rows dropped"


def _as_batches(contexts: Any, batch_size: int) -> Iterator[PackedContexts]:
    """An [N, T] array, a PackedContexts, or an iterable of either -> PackedContexts batches."""

    def split_up(p: PackedContexts) -> Iterator[PackedContexts]:
        for lo in range(0, len(p), batch_size):
            yield p.rows(lo, lo + batch_size)

    def wrap(x: Any) -> PackedContexts:
        if isinstance(x, PackedContexts):
            return x
        arr = np.asarray(x)
        if arr.ndim != 2:
            raise SaeensError(f"contexts must be an int [n_contexts, context_length] array, got shape {arr.shape}")
        n = arr.shape[0]
        return PackedContexts(arr.astype(np.int32), np.full(n, -1, np.int32), np.full(n, -1, np.int32))

    if isinstance(contexts, (np.ndarray, PackedContexts)) or hasattr(contexts, "__array__"):
        yield from split_up(wrap(contexts))
        return
    for item in contexts:
        yield from split_up(wrap(item))


def _locate_bad_row(acts_ND: np.ndarray, tokens_N: np.ndarray, row0: int, T: int, split: str) -> None:
    finite_N = np.isfinite(acts_ND).all(axis=1)
    if finite_N.all():
        return
    i = int(np.argmin(finite_N))
    r = row0 + i
    raise SaeensError(
        f"{split} row {r} (context {r // (T - 1)}, position {1 + r % (T - 1)}, token {int(tokens_N[i])}) holds NaN/Inf "
        f"activations: run the model in float32 or pick another layer"
    )


class _SplitRows:
    """Book-keeping of one split while its contexts stream through: rows and contexts so far
    (skipped ones included), and the (document, offset) of each context for contexts_<split>.npy."""

    def __init__(self, split: str, n_rows: int | None, bar: Any):
        self.split, self.n_rows, self.bar = split, n_rows, bar
        self.T: int | None = None
        self.written = self.n_ctx = 0
        self.max_doc = -1
        self.ctx_info: list[np.ndarray] = []  # [n, 2] per batch: 8 bytes per context, not per row

    def context_length(self, batch: PackedContexts) -> int:
        """The contexts' length, the same for every batch."""
        T = int(batch.tokens_NT.shape[1])
        if self.T is None and T < 2:
            raise SaeensError(f"context length {T} leaves no rows after dropping BOS: use at least 2")
        if self.T is not None and T != self.T:
            raise SaeensError(f"contexts of lengths {self.T} and {T} mixed: pack them to one length")
        self.T = T
        return T

    def full(self) -> bool:
        return self.n_rows is not None and self.written >= self.n_rows

    def account(self, batch: PackedContexts, rows: int) -> int:
        """Count `rows` rows of the contexts of `batch` (capped by n_rows); returns the count."""
        assert self.T is not None
        rows = rows if self.n_rows is None else min(rows, self.n_rows - self.written)
        used = batch.rows(None, -(-rows // (self.T - 1)))
        self.ctx_info.append(np.stack([used.doc_index_N, used.doc_offset_N], axis=1))
        if len(used):
            self.max_doc = max(self.max_doc, int(used.doc_index_N.max()))
        self.written += rows
        self.n_ctx += len(used)
        self.bar.update(rows)
        return rows

    def save(self, writer: CacheWriter, documents: Sequence[Document] | None) -> None:
        """contexts_<split>.npy, documents_<split>.json (given the documents) and meta.json's entry."""
        ctx = np.concatenate(self.ctx_info) if self.ctx_info else np.zeros((0, 2), np.int32)
        atomic_save_npy(writer.out / f"contexts_{self.split}.npy", ctx.astype(np.int32))
        entry = {"rows": int(self.written), "contexts": int(self.n_ctx), "contexts_file": f"contexts_{self.split}.npy"}
        if documents is not None:
            used = documents[: self.max_doc + 1]
            atomic_write_text(
                writer.out / f"documents_{self.split}.json",
                json.dumps([{"doc_id": d.doc_id, "label": d.label, **dict(d.attributes)} for d in used]),
            )
            entry["documents_file"] = f"documents_{self.split}.json"
            entry["documents"] = len(used)
        writer.meta.setdefault("splits", {})[self.split] = entry


def _write_batch(acts_future: Any, batch: PackedContexts, drop: int, rows: _SplitRows, writer: CacheWriter | None,
                 new_writer: Callable[[int], CacheWriter]) -> CacheWriter:
    """Materialise one batch's activations and write its rows but the first `drop` (already cached);
    the first batch opens the writer (`new_writer(d_in)`)."""
    acts_BTD = np.asarray(acts_future, dtype=np.float32)[: len(batch)]  # bf16 models: cast before the checks
    if acts_BTD.ndim != 3 or acts_BTD.shape[:2] != batch.tokens_NT.shape:
        raise SaeensError(
            f"acts_fn returned shape {acts_BTD.shape} for tokens of shape {batch.tokens_NT.shape}: "
            f"it must return [batch, context, d_in]"
        )
    d = acts_BTD.shape[2]
    writer = writer if writer is not None else new_writer(d)
    _record_layout(writer, rows.T, rows.split)
    acts_ND = acts_BTD[:, 1:, :].reshape(-1, d)
    toks_N = batch.tokens_NT[:, 1:].reshape(-1)
    row0 = rows.written
    keep = rows.account(batch, acts_ND.shape[0])
    if keep > drop:
        _locate_bad_row(acts_ND[drop:keep], toks_N[drop:keep], row0 + drop, rows.T, rows.split)
        writer.add(acts_ND[drop:keep], toks_N[drop:keep], rows.split)
    return writer


def extract_to_cache(
    acts_fn: ActsFn,
    contexts: Any,
    out: str | Path | CacheWriter,
    split: str = "train",
    *,
    n_rows: int | None = None,
    batch_size: int = 32,
    meta: dict[str, Any] | None = None,
    documents: Sequence[Document] | None = None,
    shard_rows: int = 65536,
    progress: bool = True,
    skip_rows: int = 0,
) -> int:
    """Run `acts_fn` over `contexts` (int [N, T] array, PackedContexts, or an iterable of them,
    every context starting with BOS) in batches of `batch_size`, drop the BOS rows, and write at
    most `n_rows` rows (None: all) of split `split` through a CacheWriter. `out` is a new cache
    directory (written and closed here, with `meta` added to meta.json) or an open CacheWriter
    (appended to; the caller closes it). Also writes contexts_<split>.npy and, given `documents`,
    documents_<split>.json. Returns the number of rows of the split (skipped ones included).

    skip_rows (a resumed run, `out` an open CacheWriter): the first skip_rows rows of these
    contexts are already in the cache. Their contexts are still walked (the layout files list
    them) but not run through the model; a context cut by a shard boundary is run and only its
    missing rows are added."""
    writer = out if isinstance(out, CacheWriter) else None
    if writer is None:
        out = Path(out)
        if out.exists() and any(out.iterdir()):  # the same check as CacheWriter, before any model work
            raise SaeensError(f"output directory {out} is not empty: choose a new --out or delete it first")
        if skip_rows:
            raise SaeensError("skip_rows needs an open CacheWriter (a resumed cache) as `out`")
    own = writer is None
    if batch_size < 1:
        raise SaeensError(f"batch size {batch_size} must be positive: use e.g. 32")

    from tqdm.auto import tqdm

    bar = tqdm(total=n_rows, unit="tok", desc=f"caching {split}", disable=not progress, leave=False)
    rows = _SplitRows(split, n_rows, bar)

    def new_writer(d: int) -> CacheWriter:
        return CacheWriter(out, d, {"model": None, "hook": None, "context_length": rows.T, **(meta or {})}, shard_rows)

    pending = None  # (activations being computed, their batch, rows of it already cached)
    queued = 0  # rows of the contexts taken from `contexts` so far (skipped, dispatched or written)
    try:
        for batch in _as_batches(contexts, batch_size) if n_rows is None or n_rows > 0 else ():
            T = rows.context_length(batch)
            drop = max(0, skip_rows - queued)  # rows at the start of this batch already in the cache
            if drop:
                assert writer is not None and pending is None  # skipped rows come before any computed one
                full = min(drop // (T - 1), len(batch))  # whole contexts already cached: layout only
                if full:
                    queued += rows.account(batch.rows(None, full), full * (T - 1))
                    _record_layout(writer, T, split)
                    if rows.full():
                        break
                    batch = batch.rows(full)
                    if not len(batch):
                        continue
                drop = skip_rows - queued  # < T - 1: only part of the next context is cached
                if n_rows is not None and queued + drop >= n_rows:
                    queued += rows.account(batch, drop)  # the split's last, cut context is cached already
                    break
            queued += len(batch) * (T - 1)
            toks = batch.tokens_NT
            if len(batch) < batch_size:  # pad to one shape: a jitted acts_fn compiles once
                toks = np.concatenate([toks, np.repeat(toks[:1], batch_size - len(batch), axis=0)])
            future = acts_fn(toks)  # jax dispatches asynchronously: overlap with the previous write
            if pending is not None:
                writer = _write_batch(*pending, rows, writer, new_writer)
                if rows.full():
                    pending = None
                    break
            pending = (future, batch, drop)
        if pending is not None:
            writer = _write_batch(*pending, rows, writer, new_writer)
    finally:
        bar.close()

    if writer is None:
        if own:
            raise SaeensError(f"no {split} contexts to cache: the corpus is empty or shorter than one context")
        return 0
    rows.save(writer, documents)
    if own:
        writer.close()
    return rows.written


def _record_layout(writer: CacheWriter, T: int, split: str) -> None:
    m = writer.meta
    if m.get("context_length") not in (None, T):
        raise SaeensError(f"{split} contexts have length {T}, the cache holds length {m['context_length']}: use one length")
    m["context_length"] = T
    m["bos_dropped"] = True
    m["rows_per_context"] = T - 1
    m["layout"] = LAYOUT
    m["contexts_columns"] = ["document", "token_offset"]


def model_acts_fn(model: Any, hook: str) -> ActsFn:
    """acts_fn for a saeens.models Transformer: jitted, stops after the hook's layer."""
    from saeens.models import parse_hook, run_to_hook

    cfg = getattr(model, "cfg", None)
    if cfg is not None:  # validate the hook now, not mid-run (without compiling anything)
        parse_hook(hook, cfg.n_layers, getattr(cfg, "parallel_residual", False))
    return lambda tokens_BT: run_to_hook(model, tokens_BT, hook)
