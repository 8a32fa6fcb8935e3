"""The text behind a row of the cache: its context, the tokens around it and the feature's
activation on each of them.

A cache written from a corpus records its layout: row r of a split is context r // (T - 1),
position 1 + r % (T - 1) (T the context length, BOS rows dropped), contexts_<split>.npy holds each
context's (document, token offset) and documents_<split>.json the documents' ids and labels. A
window around a row never crosses its context. The activations on the window's tokens come from
one more gather over the needed rows only (the union of all windows: at most the split's rows).
A cache written from a bare array has no text: its windows are the row alone.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from saeens import ensemble
from saeens.data.cache import ActivationCache
from saeens.ensemble import Ensemble


def split_parts(acts: ActivationCache, split: str) -> list[tuple[str, int]]:
    """(split name, rows) of the splits that `split` concatenates, in row order ("all": train, test)."""
    names = ("train", "test") if split == "all" else (split,)
    return [(s, acts.n_rows(s)) for s in names]


def windows(acts: ActivationCache, split: str, rows_N: np.ndarray, before: int, after: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) rows of `split` around each row: up to `before` rows before it and `after` after it,
    clipped to its context (to the row itself when the cache records no context layout)."""
    rows_N = np.asarray(rows_N, np.int64)
    per_ctx = acts.meta.get("rows_per_context")
    if not per_ctx:
        return rows_N.copy(), rows_N + 1
    lo_N, hi_N = np.empty_like(rows_N), np.empty_like(rows_N)
    start = 0
    for _, n in split_parts(acts, split):
        sel = (rows_N >= start) & (rows_N < start + n)
        local = rows_N[sel] - start
        ctx_lo = local - local % per_ctx
        lo_N[sel] = start + np.maximum(ctx_lo, local - before)
        hi_N[sel] = start + np.minimum(np.minimum(ctx_lo + per_ctx, n), local + after + 1)
        start += n
    return lo_N, hi_N


@jax.jit
def _encode(ens: Ensemble, x_BD: jax.Array) -> jax.Array:
    return ensemble.encode(ens, x_BD)


def codes_at(ens: Ensemble, acts: ActivationCache, split: str, features_P: np.ndarray, rows_P: np.ndarray,
             chunk_rows: int = 2048) -> np.ndarray:
    """The code of feature features_P[p] on row rows_P[p] of `split` [P], encoding each distinct row once."""
    features_P, rows_P = np.asarray(features_P), np.asarray(rows_P, np.int64)
    uniq_U, pos_P = np.unique(rows_P, return_inverse=True)
    out_P = np.zeros(rows_P.shape[0], np.float32)
    order = np.argsort(pos_P, kind="stable")
    bounds = np.searchsorted(pos_P[order], np.arange(0, uniq_U.shape[0] + chunk_rows, chunk_rows))
    for c, lo in enumerate(range(0, uniq_U.shape[0], chunk_rows)):
        rows_C = uniq_U[lo : lo + chunk_rows]
        x_CD = acts.gather(rows_C, split)
        if rows_C.shape[0] < chunk_rows:  # one compiled shape for every chunk
            x_CD = np.concatenate([x_CD, np.zeros((chunk_rows - rows_C.shape[0], x_CD.shape[1]), np.float32)])
        codes_CF = np.asarray(_encode(ens, x_CD))
        sel = order[bounds[c] : bounds[c + 1]]
        out_P[sel] = codes_CF[pos_P[sel] - lo, features_P[sel]]
    return out_P


def token_decoder(tokenizer: Any) -> Callable[[int], str]:
    """id -> its text (one id at a time, memoised); without a tokenizer "#<id>"."""
    memo: dict[int, str] = {}

    def decode(tid: int) -> str:
        if tid not in memo:
            if tid < 0:
                memo[tid] = "?"
            elif tokenizer is None:
                memo[tid] = f"#{tid}"
            else:
                memo[tid] = tokenizer.decode([tid])
        return memo[tid]

    return decode


def row_sources(acts: ActivationCache, split: str, rows_N: np.ndarray) -> list[dict[str, Any]]:
    """For each row: split, context, position (in the context, BOS = 0) and, when recorded, the
    document's id and label."""
    per_ctx = acts.meta.get("rows_per_context")
    out: list[dict[str, Any]] = [{} for _ in rows_N]
    start = 0
    for name, n in split_parts(acts, split):
        info = acts.meta.get("splits", {}).get(name, {})
        ctx_file, doc_file = info.get("contexts_file"), info.get("documents_file")
        ctx_C2 = np.load(acts.path / ctx_file) if ctx_file and (acts.path / ctx_file).is_file() else None
        docs = json.loads((acts.path / doc_file).read_text()) if doc_file and (acts.path / doc_file).is_file() else None
        for i, r in enumerate(rows_N):
            if not start <= r < start + n:
                continue
            local = int(r) - start
            src: dict[str, Any] = {"split": name, "row": local}
            if per_ctx:
                ctx = local // per_ctx
                src.update(context=ctx, position=1 + local % per_ctx)
                if ctx_C2 is not None and ctx < len(ctx_C2):
                    doc = int(ctx_C2[ctx, 0])
                    src["document"] = doc
                    if docs is not None and doc < len(docs):
                        src["doc_id"], src["label"] = docs[doc].get("doc_id"), docs[doc].get("label")
            out[i] = src
        start += n
    return out


def top_contexts(ens: Ensemble, acts: ActivationCache, split: str, features_S: np.ndarray, top_row_SN: np.ndarray,
                 top_value_SN: np.ndarray, tokenizer: Any, before: int = 16, after: int = 4) -> list[list[dict[str, Any]]]:
    """For each selected feature, its top rows as {"value", "tokens", "acts", "focus" (the row's index in
    the window), + `row_sources`}: the text around the row with the feature's code on every token."""
    feats, rows, n_of = [], [], []
    for s, f in enumerate(features_S):
        for r in top_row_SN[s]:
            if r >= 0:
                feats.append(f)
                rows.append(r)
        n_of.append(int(np.sum(top_row_SN[s] >= 0)))
    rows_P = np.asarray(rows, np.int64)
    lo_P, hi_P = windows(acts, split, rows_P, before, after)
    win_f = np.repeat(np.asarray(feats, np.int64), hi_P - lo_P)
    win_r = np.concatenate([np.arange(a, b) for a, b in zip(lo_P, hi_P)]) if len(rows) else np.zeros(0, np.int64)
    vals = codes_at(ens, acts, split, win_f, win_r) if len(win_r) else np.zeros(0, np.float32)
    tokens_all = acts.tokens(split)
    decode = token_decoder(tokenizer)
    sources = row_sources(acts, split, rows_P)
    out, p, v = [], 0, 0
    for s, n in enumerate(n_of):
        items = []
        for i in range(n):
            lo, hi = int(lo_P[p]), int(hi_P[p])
            items.append({
                "value": float(top_value_SN[s, i]),
                "tokens": [decode(int(t)) for t in tokens_all[lo:hi]],
                "acts": [round(float(a), 4) for a in vals[v : v + hi - lo]],
                "focus": int(rows_P[p] - lo),
                **sources[p],
            })
            v += hi - lo
            p += 1
        out.append(items)
    return out
