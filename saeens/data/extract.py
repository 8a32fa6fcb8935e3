"""Token contexts -> model activations at one hook -> the on-disk activation cache (cache.py).

The model is any `acts_fn(tokens_BT int32) -> acts_BTD` (a truncated, jitted transformer; a fake
one in tests); `model_acts_fn` builds it from saeens.models. Contexts stream through in batches
and rows go straight to `CacheWriter` shards, so peak memory is one batch + one shard, whatever
n_tokens is.

Layout recorded in meta.json (bos_dropped = true): each context of length T gives T-1 rows, its
BOS position 0 is dropped (its norm is a huge outlier). Row r of a split's concatenated rows is
context r // (T-1), position 1 + r % (T-1); its token id is in the tokens_*.npy shards, and
contexts_<split>.npy (int32 [n_contexts, 2]) gives for each context (document index, token offset
within that document of position 1), indices into documents_<split>.json (doc_id, label in packing
order). Document separators (BOS, see tokens.py) inside a context are kept as rows.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saeens.data.cache import CacheWriter, atomic_write_text
from saeens.data.corpora import Document, load_corpus, split_documents
from saeens.data.tokens import PackedContexts, iter_packed, tokenizer_name
from saeens.errors import SaeensError

ActsFn = Callable[[np.ndarray], Any]  # int32 [B, T] -> float [B, T, D] (numpy or jax array)
LAYOUT = "row r of a split = context r // (context_length - 1), position 1 + r % (context_length - 1); BOS rows dropped"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _as_batches(contexts: Any, batch_size: int) -> Iterator[PackedContexts]:
    """An [N, T] array, a PackedContexts, or an iterable of either -> PackedContexts batches."""

    def split_up(p: PackedContexts) -> Iterator[PackedContexts]:
        for lo in range(0, len(p), batch_size):
            yield PackedContexts(p.tokens_NT[lo : lo + batch_size], p.doc_index_N[lo : lo + batch_size],
                                 p.doc_offset_N[lo : lo + batch_size])

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
) -> int:
    """Run `acts_fn` over `contexts` (int [N, T] array, PackedContexts, or an iterable of them,
    every context starting with BOS) in batches of `batch_size`, drop the BOS rows, and write at
    most `n_rows` rows (None: all) of split `split` through a CacheWriter. `out` is a new cache
    directory (written and closed here, with `meta` added to meta.json) or an open CacheWriter
    (appended to; the caller closes it). Also writes contexts_<split>.npy and, given `documents`,
    documents_<split>.json. Returns the number of rows written."""
    if isinstance(out, CacheWriter):
        writer: CacheWriter | None = out
        own = False
    else:
        out = Path(out)
        if out.exists() and any(out.iterdir()):  # the same check as CacheWriter, before any model work
            raise SaeensError(f"output directory {out} is not empty: choose a new --out or delete it first")
        writer, own = None, True
    if batch_size < 1:
        raise SaeensError(f"batch size {batch_size} must be positive: use e.g. 32")

    from tqdm.auto import tqdm

    bar = tqdm(total=n_rows, unit="tok", desc=f"caching {split}", disable=not progress, leave=False)
    written, n_ctx, T = 0, 0, None
    ctx_info: list[np.ndarray] = []  # [n, 2] per batch: 8 bytes per context, not per row
    max_doc = -1

    def drain(pending: tuple[Any, PackedContexts]) -> bool:
        """Materialise one batch's activations and write its rows; False once n_rows are written."""
        nonlocal writer, written, n_ctx, max_doc
        acts_future, batch = pending
        b = len(batch)
        acts_BTD = np.asarray(acts_future, dtype=np.float32)[:b]  # bf16 models: cast before the checks
        if acts_BTD.ndim != 3 or acts_BTD.shape[:2] != batch.tokens_NT.shape:
            raise SaeensError(
                f"acts_fn returned shape {acts_BTD.shape} for tokens of shape {batch.tokens_NT.shape}: "
                f"it must return [batch, context, d_in]"
            )
        d = acts_BTD.shape[2]
        if writer is None:
            info = {"model": None, "hook": None, "context_length": T, **(meta or {})}
            writer = CacheWriter(out, d, info, shard_rows)
        _record_layout(writer, T, split)
        acts_ND = acts_BTD[:, 1:, :].reshape(-1, d)
        toks_N = batch.tokens_NT[:, 1:].reshape(-1)
        keep = acts_ND.shape[0] if n_rows is None else min(acts_ND.shape[0], n_rows - written)
        used_ctx = -(-keep // (T - 1))
        _locate_bad_row(acts_ND[:keep], toks_N[:keep], written, T, split)
        writer.add(acts_ND[:keep], toks_N[:keep], split)
        ctx_info.append(np.stack([batch.doc_index_N[:used_ctx], batch.doc_offset_N[:used_ctx]], axis=1))
        if used_ctx:
            max_doc = max(max_doc, int(batch.doc_index_N[:used_ctx].max()))
        written += keep
        n_ctx += used_ctx
        bar.update(keep)
        return n_rows is None or written < n_rows

    pending = None
    try:
        if n_rows is None or n_rows > 0:
            for batch in _as_batches(contexts, batch_size):
                if T is None:
                    T = int(batch.tokens_NT.shape[1])
                    if T < 2:
                        raise SaeensError(f"context length {T} leaves no rows after dropping BOS: use at least 2")
                elif batch.tokens_NT.shape[1] != T:
                    raise SaeensError(f"contexts of lengths {T} and {batch.tokens_NT.shape[1]} mixed: pack them to one length")
                toks = batch.tokens_NT
                if len(batch) < batch_size:  # pad to one shape: a jitted acts_fn compiles once
                    toks = np.concatenate([toks, np.repeat(toks[:1], batch_size - len(batch), axis=0)])
                future = acts_fn(toks)  # jax dispatches asynchronously: overlap with the previous write
                if pending is not None and not drain(pending):
                    pending = None
                    break
                pending = (future, batch)
            if pending is not None:
                drain(pending)
    finally:
        bar.close()

    if writer is None:
        if own:
            raise SaeensError(f"no {split} contexts to cache: the corpus is empty or shorter than one context")
        return 0
    ctx = np.concatenate(ctx_info) if ctx_info else np.zeros((0, 2), np.int32)
    _save_npy(writer.out / f"contexts_{split}.npy", ctx.astype(np.int32))
    splits = writer.meta.setdefault("splits", {})
    entry = {"rows": int(written), "contexts": int(n_ctx), "contexts_file": f"contexts_{split}.npy"}
    if documents is not None:
        used = documents[: max_doc + 1]
        atomic_write_text(
            writer.out / f"documents_{split}.json",
            json.dumps([{"doc_id": d.doc_id, "label": d.label, **dict(d.attributes)} for d in used]),
        )
        entry["documents_file"] = f"documents_{split}.json"
        entry["documents"] = len(used)
    splits[split] = entry
    if own:
        writer.close()
    return written


def _record_layout(writer: CacheWriter, T: int, split: str) -> None:
    m = writer.meta
    if m.get("context_length") not in (None, T):
        raise SaeensError(f"{split} contexts have length {T}, the cache holds length {m['context_length']}: use one length")
    m["context_length"] = T
    m["bos_dropped"] = True
    m["rows_per_context"] = T - 1
    m["layout"] = LAYOUT
    m["contexts_columns"] = ["document", "token_offset"]


# ----------------------------------------------------------------------------- corpus -> cache


def _resolve_documents(dataset: str | Sequence[Document], dataset_kwargs: dict[str, Any] | None) -> tuple[str, list[Document]]:
    if isinstance(dataset, str):
        return dataset, load_corpus(dataset, **(dataset_kwargs or {}))
    docs = list(dataset)
    if docs and not all(isinstance(d, Document) for d in docs):
        raise SaeensError("dataset must be a corpus name or a list of saeens.data.Document: wrap texts in Document")
    return "documents", docs


def cache_documents(
    acts_fn: ActsFn,
    tokenizer: Any,
    dataset: str | Sequence[Document],
    n_tokens: int | None,
    out: str | Path,
    *,
    context_length: int = 128,
    batch_size: int = 32,
    test_fraction: float = 0.1,
    seed: int = 0,
    d_in: int | None = None,
    meta: dict[str, Any] | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    shard_rows: int = 65536,
    progress: bool = True,
) -> Path:
    """The model-agnostic core of `build_cache`: split `dataset` by document, shuffle each split's
    document order (seeded), pack each split separately and cache n_tokens train rows and
    round(n_tokens * test_fraction / (1 - test_fraction)) test rows (test is that share of all
    rows). n_tokens None: every full context of both splits. A corpus too small for the request
    gives a complete, smaller cache and a warning (meta keeps n_tokens_requested)."""
    name, docs = _resolve_documents(dataset, dataset_kwargs)
    if not docs:
        raise SaeensError(f"dataset {name!r} has no documents: check the name, split and text column")
    if n_tokens is not None and n_tokens < 1:
        raise SaeensError(f"--tokens must be positive, got {n_tokens}")
    if context_length < 2:
        raise SaeensError(f"context length {context_length} is too short: use at least 2 (BOS + one token)")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise SaeensError(f"output directory {out} is not empty: choose a new --out or delete it first")
    train, test = split_documents(docs, test_fraction, seed)
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    n_test = None if n_tokens is None else int(round(n_tokens * test_fraction / (1 - test_fraction)))
    info = {
        "model": None, "hook": None, "dataset": name, "context_length": int(context_length),
        "tokenizer": tokenizer_name(tokenizer), "separator": "bos", "test_fraction": float(test_fraction),
        "split_seed": int(seed), "n_tokens_requested": n_tokens, **(meta or {}),
    }
    writer: CacheWriter | None = None
    if d_in is not None:
        writer = CacheWriter(out, d_in, info, shard_rows)

    def run(split: str, split_docs: list[Document], want: int | None) -> int:
        nonlocal writer
        if want == 0 or not split_docs:
            return 0
        max_ctx = None if want is None else -(-want // (context_length - 1))
        batches = iter_packed(split_docs, tokenizer, context_length, batch_size, max_contexts=max_ctx)
        if writer is None:  # learn d_in from the first batch, then continue with a writer
            first = next(batches, None)
            if first is None:
                return 0
            pad = np.repeat(first.tokens_NT[:1], batch_size - len(first), axis=0)  # the shape the loop uses
            d = int(np.asarray(acts_fn(np.concatenate([first.tokens_NT, pad]))).shape[-1])
            writer = CacheWriter(out, d, info, shard_rows)
            batches = _chain(first, batches)
        return extract_to_cache(acts_fn, batches, writer, split, n_rows=want, batch_size=batch_size,
                                documents=split_docs, progress=progress)

    got_train = run("train", train, n_tokens)
    if got_train == 0:
        raise SaeensError(
            f"dataset {name!r} gives no full context of {context_length} tokens for training: "
            f"use a shorter --context-length or a larger dataset"
        )
    got_test = run("test", test, n_test)
    assert writer is not None
    for split, want, got in (("train", n_tokens, got_train), ("test", n_test, got_test)):
        if want is not None and got < want:
            warnings.warn(
                f"dataset {name!r} gave only {got} {split} tokens of the {want} asked for at context length "
                f"{context_length}: the cache holds {got}",
                stacklevel=2,
            )
    return writer.close()


def _chain(first: PackedContexts, rest: Iterable[PackedContexts]) -> Iterator[PackedContexts]:
    yield first
    yield from rest


# ----------------------------------------------------------------------------- model -> cache


def model_acts_fn(model: Any, hook: str) -> ActsFn:
    """acts_fn for a saeens.models Transformer: jitted, stops after the hook's layer."""
    from saeens.models import parse_hook, run_to_hook

    cfg = getattr(model, "cfg", None)
    if cfg is not None:  # validate the hook now, not mid-run (without compiling anything)
        parse_hook(hook, cfg.n_layers, getattr(cfg, "parallel_residual", False))
    return lambda tokens_BT: run_to_hook(model, tokens_BT, hook)


def build_cache(
    model_name: str,
    layer: int,
    site: str,
    dataset: str | Sequence[Document],
    n_tokens: int | None,
    out: str | Path,
    *,
    context_length: int = 128,
    batch_size: int = 32,
    test_fraction: float = 0.1,
    seed: int = 0,
    dataset_kwargs: dict[str, Any] | None = None,
    shard_rows: int = 65536,
    progress: bool = True,
) -> Path:
    """`saeens cache`: activations of `model_name` (a saeens.models name or path) at
    blocks.{layer}.hook_{site} on `dataset` (a corpus name, see corpora.py, or Documents)."""
    from saeens.models import hook_name, load_model

    hook = hook_name(layer, site)
    out = Path(out)
    if out.exists() and any(out.iterdir()):  # fail before loading the model
        raise SaeensError(f"output directory {out} is not empty: choose a new --out or delete it first")
    model, tokenizer = load_model(model_name)
    acts_fn = model_acts_fn(model, hook)
    cfg = getattr(model, "cfg", None)
    meta = {"model": model_name, "hook": hook, "layer": int(layer), "site": hook.split(".hook_")[-1],
            "tokenizer": getattr(tokenizer, "name_or_path", "") or f"{model_name} (its own tokenizer)"}
    return cache_documents(
        acts_fn, tokenizer, dataset, n_tokens, out, context_length=context_length, batch_size=batch_size,
        test_fraction=test_fraction, seed=seed, d_in=getattr(cfg, "d_model", None), meta=meta,
        dataset_kwargs=dataset_kwargs, shard_rows=shard_rows, progress=progress,
    )
