"""Training batches computed by the model while training runs: no activation cache on disk.

The corpus is split and packed exactly as `saeens cache` does it (data/build.shuffled_split,
data/tokens.pack_documents: BOS first, BOS rows dropped, separators kept), so row (context c,
position t) of a stream is row c * (T-1) + t - 1 of a cache of the same contexts. The int32 token
contexts of the corpus stay in memory (4 bytes a token: the corpus, not the tokens trained); the
activations live only in a bounded buffer.

Data order, a pure function of (seed, step) and the corpus (nothing to save, nothing to restore):
  epoch e       the N train contexts in a seeded order pi_e (rng [seed, e])
  window w      the W contexts pi_e[w*W : (w+1)*W] (the shuffle buffer; the last may be shorter);
                its W*(T-1) rows in a seeded order sigma_{e,w} (rng [seed, e, w])
  row stream    the windows of epoch 0, then of epoch 1, ...; batch s = rows [s*B, (s+1)*B)
                (a batch may straddle two windows or epochs)
  inside a batch  rows sorted by the context's relative place in its window j / W (then window,
                context, position): the step is blind to row order, and the sort gives each
                contiguous slice few contexts, the same ones batch after batch.

Multi-host: the global batch never depends on the number of processes. A process asks for the
contiguous rows its devices hold (`rows=`), runs the model only on the contexts behind those
rows and keeps their activations until its batches leave their window. Sorted as above, process p
of P holds, in every batch, rows of the contexts j in about [p W/P, (p+1) W/P) of each window the
batch draws from (also when it straddles two), so each context runs through the model about once
per epoch in all (plus a few at the slices' edges). After a
kill the buffer is simply empty: the resumed step's contexts run through the model again.

Massive-activation rows follow the cache's rule (data/outliers.py: norm above `outlier_factor` x
the split's median norm), with the median taken over a fixed reference, the split's first
REFERENCE_CONTEXTS contexts in packing order (a stream never holds the whole split). A training
batch keeps its shape, so a flagged row is replaced by the nearest unflagged row of its own context
(the whole context is in the buffer of the process that needs the row, so the batch still never
depends on the processes); held-out chunks leave flagged rows out, as a cache's kept rows do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from saeens.data.build import CONTEXT_LENGTH, SPLIT_SEED, TEST_FRACTION, shuffled_split
from saeens.data.corpora import Document
from saeens.data.outliers import OUTLIER_FACTOR, check_factor
from saeens.data.tokens import PackedContexts, pack_documents, tokenizer_name
from saeens.errors import SaeensError

BUFFER_CONTEXTS = 256  # contexts whose rows are shuffled together (75 MB for d=576, T=128)
MODEL_BATCH = 32  # contexts per model call (every call padded to it: one compiled program)
REFERENCE_CONTEXTS = 64  # contexts whose median row norm sets a stream's outlier threshold


@lru_cache(maxsize=4)
def _order(n: int, *seed: int) -> np.ndarray:
    return np.random.default_rng(list(seed)).permutation(n)


def batch_rows(n_contexts: int, rows_per_context: int, window: int, seed: int, step: int,
               batch_size: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(context_B, position_B, windows) of global batch `step`, in batch order (sorted, see the
    module docstring): the train context and position (1..T-1) of each row, and the (epoch,
    window) pairs the batch draws from."""
    R, W = rows_per_context, window
    n_windows = -(-n_contexts // W)
    pos_B = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch_B, q_B = np.divmod(pos_B, n_contexts * R)
    win_B, off_B = np.divmod(q_B, W * R)
    ctx_B, j_B, t_B = (np.empty(batch_size, np.int64) for _ in range(3))
    place_B = np.empty(batch_size)  # j / (contexts in the window)
    windows = sorted({(int(e), int(w)) for e, w in zip(epoch_B, win_B)})
    for e, w in windows:
        sel = (epoch_B == e) & (win_B == w)
        members = _order(n_contexts, seed, e)[w * W : (w + 1) * W]
        j_B[sel], t_B[sel] = np.divmod(_order(len(members) * R, seed, e, w)[off_B[sel]], R)
        ctx_B[sel], place_B[sel] = members[j_B[sel]], j_B[sel] / len(members)
    order = np.lexsort((t_B, j_B, epoch_B * n_windows + win_B, place_B))
    return ctx_B[order], t_B[order] + 1, windows


def window_contexts(n_contexts: int, window: int, seed: int, epoch: int, w: int) -> np.ndarray:
    """The train contexts of window w of epoch `epoch`."""
    return _order(n_contexts, seed, epoch)[w * window : (w + 1) * window]


class ContextRunner:
    """The model's activations (BOS rows dropped, float32 [n, T-1, d_in]) of packed contexts by
    index, MODEL_BATCH contexts a call, the next call dispatched before the last is read back."""

    def __init__(self, acts_fn: Callable[[np.ndarray], Any], contexts: PackedContexts, split: str,
                 model_batch: int = MODEL_BATCH):
        if model_batch < 1:
            raise SaeensError(f"model batch {model_batch} must be positive: use e.g. {MODEL_BATCH}")
        self.acts_fn, self.contexts, self.split, self.model_batch = acts_fn, contexts, split, model_batch
        self.n_contexts, self.T = (int(v) for v in contexts.tokens_NT.shape)
        self.contexts_run = 0  # contexts run through the model so far (padding excluded)

    def run(self, ctx_N: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(context ids, activations [n, T-1, D]) chunk by chunk, in the order of ctx_N."""
        ctx_N = np.asarray(ctx_N, np.int64)
        chunks = [ctx_N[lo : lo + self.model_batch] for lo in range(0, len(ctx_N), self.model_batch)]
        pending = None
        for ids in [*chunks, None]:
            future = None
            if ids is not None:
                toks = self.contexts.tokens_NT[ids]
                pad = self.model_batch - len(ids)
                future = self.acts_fn(np.concatenate([toks, np.repeat(toks[:1], pad, axis=0)]) if pad else toks)
            if pending is not None:
                yield pending[0], self._check(pending[0], pending[1])
            pending = None if ids is None else (ids, future)

    def _check(self, ids: np.ndarray, future: Any) -> np.ndarray:
        acts_NTD = np.asarray(future, np.float32)[: len(ids)]  # bf16 models: cast before the checks
        if acts_NTD.ndim != 3 or acts_NTD.shape[1] != self.T:
            raise SaeensError(f"the model returned shape {acts_NTD.shape} for contexts of length {self.T}: "
                              "it must return [batch, context, d_in]")
        acts_NTD = acts_NTD[:, 1:]
        self.contexts_run += len(ids)
        finite_NT = np.isfinite(acts_NTD).all(axis=2)
        if not finite_NT.all():
            n, t = (int(v) for v in np.argwhere(~finite_NT)[0])
            c = int(ids[n])
            raise SaeensError(
                f"{self.split} context {c} (document {int(self.contexts.doc_index_N[c])}, token offset "
                f"{int(self.contexts.doc_offset_N[c])}) position {t + 1} holds NaN/Inf activations: run the model "
                "in float32 or pick another layer"
            )
        return acts_NTD


def outlier_threshold(runner: ContextRunner, factor: float | None) -> float | None:
    """factor x the median row norm of the split's first REFERENCE_CONTEXTS contexts (None: no rule)."""
    check_factor(factor)
    if factor is None:
        return None
    ids = np.arange(min(REFERENCE_CONTEXTS, runner.n_contexts))
    norms = np.concatenate([np.linalg.norm(a_NTD, axis=-1).reshape(-1) for _, a_NTD in runner.run(ids)])
    runner.contexts_run -= len(ids)  # a one-off reference, not training work
    return float(factor * np.median(norms))


def replace_flagged(rows_TD: np.ndarray, threshold: float | None) -> np.ndarray:
    """A context's rows with each flagged row replaced by the nearest unflagged row (earlier on a tie)."""
    if threshold is None:
        return rows_TD
    kept_T = np.linalg.norm(rows_TD, axis=-1) <= threshold
    if kept_T.all() or not kept_T.any():
        return rows_TD
    pos_K = np.flatnonzero(kept_T)
    t_T = np.arange(len(rows_TD))
    nearest_T = pos_K[np.argmin(np.abs(t_T[:, None] - pos_K[None, :]), axis=1)]
    return rows_TD[nearest_T]


class ModelStream:
    """A BatchSource (saeens/data/source.py) whose batches the model computes on the fly, in the
    data order of the module docstring; `buffer` holds at most the contexts of the windows of the
    last batch (those this process needed)."""

    def __init__(self, runner: ContextRunner, info: dict[str, Any], d_in: int, buffer_contexts: int = BUFFER_CONTEXTS,
                 threshold: float | None = None):
        if buffer_contexts < 1:
            raise SaeensError(f"--buffer-contexts {buffer_contexts} must be positive: use e.g. {BUFFER_CONTEXTS}")
        self.runner, self.info, self.d_in, self.window = runner, info, int(d_in), int(buffer_contexts)
        self.threshold = threshold
        self.rows_per_context = runner.T - 1
        self.buffer: dict[int, np.ndarray] = {}  # train context -> its rows [T-1, d_in]

    @property
    def n_contexts(self) -> int:
        return self.runner.n_contexts

    def describe(self) -> dict[str, Any]:
        return {"kind": "stream", "path": None, "d_in": self.d_in,
                "train_rows": self.n_contexts * self.rows_per_context, **self.info,
                "context_length": self.runner.T, "buffer_contexts": self.window}

    def init_sample(self, n: int, seed: int) -> np.ndarray:
        """n seeded rows of the first ~2n/(T-1) contexts of epoch 0's order: the contexts that
        batch 0 of a new run needs first, so they run through the model once for both (not n
        contexts for n rows, a model call's share each); the same on every process."""
        R = self.rows_per_context
        ctx = np.sort(_order(self.n_contexts, seed, 0)[: -(-2 * n // R)])
        rows_ND = np.empty((len(ctx) * R, self.d_in), np.float32)
        for lo, (ids, acts_NTD) in zip(range(0, len(ctx), self.runner.model_batch), self.runner.run(ctx)):
            acts_NTD = np.stack([replace_flagged(a, self.threshold) for a in acts_NTD])
            rows_ND[lo * R : (lo + len(ids)) * R] = acts_NTD.reshape(-1, self.d_in)
            self.buffer.update(zip(ids.tolist(), acts_NTD))
        rng = np.random.default_rng([seed, 1 << 30])
        return rows_ND[np.sort(rng.choice(len(rows_ND), size=min(n, len(rows_ND)), replace=False))]

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
        ctx_B, pos_B, windows = batch_rows(self.n_contexts, self.rows_per_context, self.window, seed, step, batch_size)
        ctx_N, pos_N = ctx_B[rows], pos_B[rows]
        keep = set(np.concatenate([window_contexts(self.n_contexts, self.window, seed, e, w) for e, w in windows]).tolist())
        self.buffer = {c: a for c, a in self.buffer.items() if c in keep}  # the windows this batch left behind
        missing = np.unique(ctx_N[[c not in self.buffer for c in ctx_N.tolist()]])
        for ids, acts_NTD in self.runner.run(missing):
            self.buffer.update((c, replace_flagged(a, self.threshold)) for c, a in zip(ids.tolist(), acts_NTD))
        out_ND = np.empty((len(ctx_N), self.d_in), np.float32)
        for i, (c, t) in enumerate(zip(ctx_N.tolist(), pos_N.tolist())):
            out_ND[i] = self.buffer[c][t - 1]
        return out_ND


class HeldOutActivations:
    """The activations of one split's contexts in order (row r = context r // (T-1), position
    1 + r % (T-1), as in a cache), with the reading interface `saeens evaluate` uses (d_in,
    n_rows, chunks, gather) and a cache-like `meta` (dataset, split seed, test fraction,
    context length) for its spliced loss; nothing is kept beyond one chunk."""

    def __init__(self, runner: ContextRunner, info: dict[str, Any], d_in: int, threshold: float | None = None):
        self.runner, self.d_in, self.path, self.threshold = runner, int(d_in), None, threshold
        self.meta = {**info, "context_length": runner.T, "d_in": self.d_in}

    def _check_split(self, split: str) -> None:
        if split != self.runner.split:
            raise SaeensError(f"this stream holds the {self.runner.split} documents, not {split!r}: "
                              f"pass --split {self.runner.split}")

    def n_rows(self, split: str = "test") -> int:
        self._check_split(split)
        return self.runner.n_contexts * (self.runner.T - 1)

    def chunks(self, split: str = "test", chunk_rows: int = 8192) -> Iterator[np.ndarray]:
        self._check_split(split)
        for _, acts_NTD in self.runner.run(np.arange(self.runner.n_contexts)):
            x_ND = acts_NTD.reshape(-1, self.d_in)
            yield x_ND if self.threshold is None else x_ND[np.linalg.norm(x_ND, axis=1) <= self.threshold]

    def gather(self, idx_N: np.ndarray, split: str = "test") -> np.ndarray:
        self._check_split(split)
        ctx_N, t_N = np.divmod(np.asarray(idx_N, np.int64), self.runner.T - 1)
        rows = {}
        for ids, acts_NTD in self.runner.run(np.unique(ctx_N)):
            rows.update(zip(ids.tolist(), acts_NTD))
        return np.stack([rows[c][t] for c, t in zip(ctx_N.tolist(), t_N.tolist())]).astype(np.float32)


def documents_of(dataset: str | Sequence[Document]) -> tuple[str, list[Document]]:
    """(name, documents) of a corpus name or a list of Documents, with the cache's one-line errors."""
    from saeens.data.corpora import load_corpus

    name, docs = (dataset, load_corpus(dataset)) if isinstance(dataset, str) else ("documents", list(dataset))
    if not docs:
        raise SaeensError(f"dataset {name!r} has no documents: check the name, split and text column")
    return name, docs


def open_stream(acts_fn: Callable[[np.ndarray], Any], tokenizer: Any, dataset: str | Sequence[Document], *,
                split: str = "train", context_length: int = CONTEXT_LENGTH, test_fraction: float = TEST_FRACTION,
                split_seed: int = SPLIT_SEED, d_in: int | None = None, info: dict[str, Any] | None = None,
                buffer_contexts: int = BUFFER_CONTEXTS, model_batch: int = MODEL_BATCH,
                max_contexts: int | None = None, outlier_factor: float | None = OUTLIER_FACTOR
                ) -> ModelStream | HeldOutActivations:
    """The stream of `split` ("train": a ModelStream to train on; "test": the held-out documents,
    HeldOutActivations to evaluate on) of `dataset` under `acts_fn` (int32 [B, T] -> [B, T, D]).
    max_contexts caps the contexts packed (the first ones of the split's order); outlier_factor: the
    massive-activation rule of the module docstring (None: none)."""
    if context_length < 2:
        raise SaeensError(f"context length {context_length} is too short: use at least 2 (BOS + one token)")
    name, docs = documents_of(dataset)
    train, test = shuffled_split(docs, test_fraction, split_seed)
    contexts = pack_documents(train if split == "train" else test, tokenizer, context_length, max_contexts=max_contexts)
    if not len(contexts):
        use = "training" if split == "train" else "evaluation (its test documents)"
        raise SaeensError(f"dataset {name!r} gives no full context of {context_length} tokens for {use}: "
                          "use a shorter --context-length or a larger dataset")
    runner = ContextRunner(acts_fn, contexts, split, model_batch)
    if d_in is None:  # learn it from one model call
        d_in = int(next(runner.run(np.zeros(1, np.int64)))[1].shape[-1])
    threshold = outlier_threshold(runner, outlier_factor)
    info = {"model": None, "hook": None, **(info or {}), "dataset": name, "split_seed": int(split_seed),
            "test_fraction": float(test_fraction), "tokenizer": tokenizer_name(tokenizer),
            "outlier_factor": outlier_factor, "outlier_threshold": threshold}
    if split == "train":
        return ModelStream(runner, info, d_in, buffer_contexts, threshold)
    return HeldOutActivations(runner, info, d_in, threshold)


def model_stream(model_name: str, layer: int, site: str, dataset: str | Sequence[Document], **kw: Any
                 ) -> ModelStream | HeldOutActivations:
    """`open_stream` of `model_name` (a saeens.models name or path) truncated at
    blocks.{layer}.hook_{site}; the same checks and one-line errors as `saeens cache`."""
    from saeens.data.extract import model_acts_fn
    from saeens.models import hook_name, load_model

    hook = hook_name(layer, site)
    model, tokenizer = load_model(model_name)
    acts_fn = model_acts_fn(model, hook)  # checks the layer against the model before any corpus work
    info = {"model": model_name, "hook": hook, "layer": int(layer), "site": hook.split(".hook_")[-1]}
    return open_stream(acts_fn, tokenizer, dataset, d_in=model.cfg.d_model, info=info, **kw)


def held_out_stream(recorded: dict[str, Any], model_name: str | None, *, split: str = "test", layer: int | None = None,
                    site: str | None = None, dataset: str | None = None, context_length: int | None = None,
                    test_fraction: float | None = None, split_seed: int | None = None, tokens: int | None = None,
                    model_batch: int = MODEL_BATCH) -> HeldOutActivations:
    """`saeens evaluate RUN --model M`: the test documents of the split the run trained on (its
    `recorded` source), streamed through the model at the run's hook. Unset arguments default to
    the recorded ones; another split seed or test fraction is refused (its test documents could
    be training documents); tokens caps the contexts streamed."""
    from saeens.models import hook_name, parse_hook

    if model_name is None:
        raise SaeensError("saeens evaluate needs --activations ACTS (a cache), or --model M to stream the run's held-out documents")
    if split != "test":
        raise SaeensError(f"a stream from --model holds the held-out documents, not {split!r}: drop --split or pass --activations")
    hook = recorded.get("hook")
    if layer is not None or hook is None:
        if layer is None:
            raise SaeensError("the run does not record its hook: pass --layer L (and --site S)")
        asked = hook_name(layer, site or "resid_post")
        if hook is not None and asked != hook:
            raise SaeensError(f"the run was trained at {hook}, not at {asked}: drop --layer and --site")
        hook = asked
    for flag, key, given in (("--split-seed", "split_seed", split_seed), ("--test-fraction", "test_fraction", test_fraction)):
        if given is not None and recorded.get(key) is not None and given != recorded[key]:
            raise SaeensError(f"the run was trained on the split of {key.replace('_', ' ')} {recorded[key]}: drop {flag} "
                              "(another split's held-out documents may be training documents)")

    def pick(given: Any, key: str, default: Any) -> Any:
        return given if given is not None else recorded[key] if recorded.get(key) is not None else default

    T = pick(context_length, "context_length", CONTEXT_LENGTH)
    layer, site = parse_hook(hook)
    out = model_stream(model_name, layer, site, dataset or pick(None, "dataset", "bbc-news"), split="test",
                       context_length=T, test_fraction=pick(test_fraction, "test_fraction", TEST_FRACTION),
                       split_seed=pick(split_seed, "split_seed", SPLIT_SEED), model_batch=model_batch,
                       max_contexts=None if tokens is None else -(-tokens // (T - 1)))
    assert isinstance(out, HeldOutActivations)
    return out
