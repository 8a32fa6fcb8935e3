"""A corpus -> a complete activation cache directory (`saeens cache`), and the held-out contexts
of the documents that cache left out.

The corpus is split by document (corpora.split_documents: test_fraction, seed), each split's
document order is shuffled (seeded) and packed into contexts (tokens.py) that data/extract.py runs
through the model. meta.json records the split (dataset, split_seed, test_fraction,
context_length), so `held_out_contexts` rebuilds the test contexts from the cache alone.

Resumable (`cache_documents`, `build_cache`, so `saeens cache`): meta.json records the request
(model, hook, dataset, documents fingerprint, n_tokens, context length, seed, test fraction, shard
rows, tokenizer) and is rewritten, complete: false, after every shard. Killed at any moment and run
again with the same arguments on the same --out, the run keeps the listed shards (dropping temp
files and unlisted shards), walks the deterministic packing past the rows already cached (a
context cut by a shard boundary is recomputed, only its missing rows added) and ends with the
cache an uninterrupted run writes. A complete cache of the same request is left alone; another
request on the same directory is a one-line error.
"""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from saeens.data.cache import ActivationCache, CacheWriter, read_meta
from saeens.data.corpora import DEFAULT_SPLIT_SEED as SPLIT_SEED
from saeens.data.corpora import DEFAULT_TEST_FRACTION as TEST_FRACTION
from saeens.data.corpora import Document, load_corpus, split_documents
from saeens.data.extract import ActsFn, extract_to_cache, model_acts_fn
from saeens.data.outliers import OUTLIER_FACTOR, check_factor
from saeens.data.tokens import PackedContexts, iter_packed, pack_documents, tokenizer_name
from saeens.errors import SaeensError

# A cache's context length unless asked otherwise (and assumed for caches that do not record one);
# the split's defaults, TEST_FRACTION and SPLIT_SEED, are corpora.split_documents'.
CONTEXT_LENGTH = 128


def _resolve_documents(dataset: str | Sequence[Document], dataset_kwargs: dict[str, Any] | None) -> tuple[str, list[Document]]:
    if isinstance(dataset, str):
        return dataset, load_corpus(dataset, **(dataset_kwargs or {}))
    docs = list(dataset)
    if docs and not all(isinstance(d, Document) for d in docs):
        raise SaeensError("dataset must be a corpus name or a list of saeens.data.Document: wrap texts in Document")
    return "documents", docs


def _fingerprint(docs: Sequence[Document]) -> str:
    """Which documents, in which order (ids only: cheap), so a resumed run can tell a different corpus."""
    h = hashlib.blake2b(digest_size=8)
    for d in docs:
        h.update(d.doc_id.encode())
        h.update(b"\0")
    return h.hexdigest()


def _check_request(out: Path, request: dict[str, Any]) -> dict[str, Any] | None:
    """The meta.json of a cache in `out` written by the same request (None: `out` is new or empty).
    A cache of another request, or a directory with other files, is a one-line error."""
    if not out.exists() or not any(p.suffix != ".tmp" for p in out.iterdir()):
        return None
    old = read_meta(out) if (out / "meta.json").is_file() else None
    if old is None:
        raise SaeensError(f"output directory {out} is not empty: choose a new --out or delete it first")
    have = old.get("request")
    if have is None:
        raise SaeensError(f"{out} holds a cache written without its request parameters (cannot resume it): choose a new --out")
    for k, v in request.items():
        if k in have and have[k] != v:
            raise SaeensError(
                f"{out} holds a cache built with {k}={have[k]!r}, this run asks for {k}={v!r}: re-run with the "
                f"same arguments to resume or reuse it, or choose a new --out"
            )
    return old


def cache_documents(
    acts_fn: ActsFn,
    tokenizer: Any,
    dataset: str | Sequence[Document],
    n_tokens: int | None,
    out: str | Path,
    *,
    context_length: int = CONTEXT_LENGTH,
    batch_size: int = 32,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
    d_in: int | None = None,
    meta: dict[str, Any] | None = None,
    dataset_kwargs: dict[str, Any] | None = None,
    shard_rows: int = 65536,
    progress: bool = True,
    outlier_factor: float | None = OUTLIER_FACTOR,
) -> Path:
    """The model-agnostic core of `build_cache`: split `dataset` by document, shuffle each split's
    document order (seeded), pack each split separately and cache n_tokens train rows and
    round(n_tokens * test_fraction / (1 - test_fraction)) test rows (test is that share of all
    rows). n_tokens None: every full context of both splits. A corpus too small for the request
    gives a complete, smaller cache and a warning (meta keeps n_tokens_requested).

    Resumable: meta.json records the request (meta["request"]) and is rewritten after every shard.
    Run again with the same arguments on the same `out`, an interrupted cache continues after
    its last finished shard (the packing is deterministic, the rest is recomputed) and ends equal
    to an uninterrupted one; a complete one is left as it is. Other arguments: a one-line error.
    outlier_factor: rows above that multiple of their split's median norm are flagged when the
    cache closes (data/outliers.py; None: no masks)."""
    check_factor(outlier_factor)
    if n_tokens is not None and n_tokens < 1:
        raise SaeensError(f"--tokens must be positive, got {n_tokens}")
    if context_length < 2:
        raise SaeensError(f"context length {context_length} is too short: use at least 2 (BOS + one token)")
    out = Path(out)
    request = _request(meta, dataset, n_tokens, context_length, test_fraction, seed, shard_rows)
    request["tokenizer"] = tokenizer_name(tokenizer)
    given = not isinstance(dataset, str)  # a list of Documents: cheap to fingerprint now; a name: load it later
    if given:
        name, docs = _resolve_documents(dataset, dataset_kwargs)
        request.update(documents=len(docs), documents_fingerprint=_fingerprint(docs))
    if _check_request(out, request) is not None and _finished(out, progress):  # before loading a corpus
        return out
    if not given:
        name, docs = _resolve_documents(dataset, dataset_kwargs)
        request.update(documents=len(docs), documents_fingerprint=_fingerprint(docs))
    if not docs:
        raise SaeensError(f"dataset {name!r} has no documents: check the name, split and text column")
    old = _check_request(out, request)
    train, test = shuffled_split(docs, test_fraction, seed)
    del docs
    n_test = None if n_tokens is None else int(round(n_tokens * test_fraction / (1 - test_fraction)))
    info = {
        "model": None, "hook": None, "dataset": name, "context_length": int(context_length),
        "tokenizer": tokenizer_name(tokenizer), "separator": "bos", "test_fraction": float(test_fraction),
        "split_seed": int(seed), "n_tokens_requested": n_tokens, **(meta or {}), "request": request,
    }
    writer: CacheWriter | None = None
    if old is not None:  # an interrupted run of the same request: continue after its last shard
        writer = CacheWriter(out, int(old["d_in"]), info, shard_rows, resume=True)
        if progress:
            done = {s: writer.rows(s) for s in ("train", "test")}
            print(f"resuming the cache in {out}: {done['train']} train and {done['test']} test rows already written",
                  file=sys.stderr)
    elif d_in is not None:
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
        got = extract_to_cache(acts_fn, batches, writer, split, n_rows=want, batch_size=batch_size,
                               documents=split_docs, progress=progress, skip_rows=writer.rows(split))
        writer.flush(split)  # the split's last short shard now: shards never interleave splits, resumes are exact
        return got

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
    return writer.close(outlier_factor)


def shuffled_split(docs: Sequence[Document], test_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(train, test) documents in the order a cache packs them: split by document, then each split's
    order shuffled by the seed (train first), so a mixture of corpora is sampled evenly."""
    train, test = split_documents(docs, test_fraction, seed)
    rng = np.random.default_rng(seed)
    return [train[i] for i in rng.permutation(len(train))], [test[i] for i in rng.permutation(len(test))]


def _request(meta: dict[str, Any] | None, dataset: Any, n_tokens: int | None, context_length: int,
             test_fraction: float, seed: int, shard_rows: int) -> dict[str, Any]:
    """The parameters that decide a cache's content (batch size does not), as meta.json records them."""
    meta = meta or {}
    return {
        "model": meta.get("model"), "hook": meta.get("hook"),
        "dataset": dataset if isinstance(dataset, str) else "documents",
        "n_tokens": n_tokens, "context_length": int(context_length), "seed": int(seed),
        "test_fraction": float(test_fraction), "shard_rows": int(shard_rows),
    }


def _finished(out: Path, progress: bool) -> bool:
    old = read_meta(out)
    if not old or not old.get("complete"):
        return False
    if progress:
        print(f"the activation cache in {out} is already complete ({old['n_tokens']} rows): nothing to do",
              file=sys.stderr)
    return True


def _chain(first: PackedContexts, rest: Iterable[PackedContexts]) -> Iterator[PackedContexts]:
    yield first
    yield from rest




def build_cache(
    model_name: str,
    layer: int,
    site: str,
    dataset: str | Sequence[Document],
    n_tokens: int | None,
    out: str | Path,
    *,
    context_length: int = CONTEXT_LENGTH,
    batch_size: int = 32,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
    dataset_kwargs: dict[str, Any] | None = None,
    shard_rows: int = 65536,
    progress: bool = True,
    outlier_factor: float | None = OUTLIER_FACTOR,
) -> Path:
    """`saeens cache`: activations of `model_name` (a saeens.models name or path) at
    blocks.{layer}.hook_{site} on `dataset` (a corpus name, see corpora.py, or Documents)."""
    from saeens.models import hook_name, load_model

    check_factor(outlier_factor)  # before the model loads
    hook = hook_name(layer, site)
    out = Path(out)
    request = _request({"model": model_name, "hook": hook}, dataset, n_tokens, context_length, test_fraction, seed,
                       shard_rows)
    if _check_request(out, request) is not None and _finished(out, progress):  # before loading the model
        return out
    model, tokenizer = load_model(model_name)
    acts_fn = model_acts_fn(model, hook)
    cfg = getattr(model, "cfg", None)
    meta = {"model": model_name, "hook": hook, "layer": int(layer), "site": hook.split(".hook_")[-1],
            "tokenizer": getattr(tokenizer, "name_or_path", "") or f"{model_name} (its own tokenizer)"}
    return cache_documents(
        acts_fn, tokenizer, dataset, n_tokens, out, context_length=context_length, batch_size=batch_size,
        test_fraction=test_fraction, seed=seed, d_in=getattr(cfg, "d_model", None), meta=meta,
        dataset_kwargs=dataset_kwargs, shard_rows=shard_rows, progress=progress, outlier_factor=outlier_factor,
    )


def source_documents(acts: ActivationCache, dataset: str | None = None) -> list[Document]:
    """The corpus `acts` was built from: `dataset` when given, else the named dataset meta.json records."""
    dataset = dataset or acts.meta.get("dataset")
    if not dataset or dataset == "documents":
        raise SaeensError(f"the cache in {acts.path} does not record a named dataset: pass --dataset D "
                          "(the corpus it was built from)")
    return load_corpus(dataset)


def held_out_contexts(acts: ActivationCache, tokenizer: Any, n_contexts: int,
                      documents: Sequence[Document] | None = None) -> np.ndarray:
    """int32 [n, context_length] contexts of the TEST documents of the split `acts` was built with.

    The split (split_seed, test_fraction), the context length and the dataset come from the cache's
    meta.json, so no caller copies them by hand. documents: the corpus the cache was built from
    when it is not a named dataset (a list of Documents); checked against the cache's fingerprint
    when it records one. The test documents are taken in an order shuffled by the seed, so a
    mixture of corpora is sampled evenly.
    """
    meta = acts.meta
    documents = source_documents(acts) if documents is None else documents
    recorded = (meta.get("request") or {}).get("documents_fingerprint")
    if recorded is not None and recorded != _fingerprint(documents):
        raise SaeensError(f"these documents are not the ones the cache in {acts.path} was built from "
                          f"({meta.get('dataset')}): pass that corpus")
    seed = int(meta.get("split_seed", SPLIT_SEED))
    _, test = split_documents(list(documents), float(meta.get("test_fraction", TEST_FRACTION)), seed)
    order = np.random.default_rng(seed).permutation(len(test))
    context_length = int(meta.get("context_length") or CONTEXT_LENGTH)
    return pack_documents([test[i] for i in order], tokenizer, context_length, max_contexts=n_contexts).tokens_NT
