"""Concept detection: SAEBench sparse probing on an ensemble's codes.

    texts -> tokens (BOS first, truncated to `context_length`, right-padded to fixed shapes)
          -> model activations at the hook (the model runs only up to the hook's layer; jitted, batched)
          -> ensemble codes (`ensemble.encode`: weighted, concatenated [J*m])
          -> mean over each text's tokens, skipping BOS and padding -> pooled codes [N, F]
For each task (one-vs-rest per class; a two-class dataset is ONE task, positive = its second class):
the train and test sets are BALANCED by subsampling the larger side (positives or the pooled rest)
to the size of the smaller, uniformly at random (seed). The top-k latents by |mean_pos - mean_neg|
of the pooled codes on the balanced TRAIN set are selected, a logistic regression (L2, C = 1) is
fitted on those k, and its test accuracy is reported for each k (default 1, 2, 5). A baseline probe
on the raw mean-pooled activations (all d dims, same regression) is reported as `llm_test_accuracy`.
Features are standardised (train mean/std) before each regression: it does not change which
latents are chosen, and keeps C = 1 comparable between latents of very different scales.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saeens import ensemble
from saeens.data.labelled import LabelledDataset
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError


# ----------------------------------------------------------------------------- tokens and pooling


def tokenize_texts(tokenizer, texts: Sequence[str], context_length: int, *, bos_id: int | None = None,
                   pad_to_multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_NT int32, mask_NT bool): row n is [BOS, first context_length-1 tokens of text n, pad...].
    mask marks real tokens (BOS included); T = min(context_length, longest row rounded up to
    `pad_to_multiple`), so short texts do not pay for long contexts and shapes stay few."""
    from saeens.data.tokens import bos_token_id

    if context_length < 2:
        raise SaeensError(f"context length {context_length} is too short: use at least 2 (BOS + one token)")
    bos = bos_token_id(tokenizer) if bos_id is None else int(bos_id)
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] if len(texts) else []
    rows = [[bos] + list(r)[: context_length - 1] for r in ids]
    longest = max((len(r) for r in rows), default=2)
    T = min(context_length, -(-longest // pad_to_multiple) * pad_to_multiple)
    tokens = np.full((len(rows), T), bos, np.int32)
    mask = np.zeros((len(rows), T), bool)
    for n, r in enumerate(rows):
        tokens[n, : len(r)] = r
        mask[n, : len(r)] = True
    return tokens, mask


def pool_weights(mask_BT: jax.Array) -> jax.Array:
    """Per-position mean-pooling weights [B, T]: 1/n_real over real non-BOS tokens (position 0 is BOS)."""
    w = mask_BT.astype(jnp.float32).at[:, 0].set(0.0)
    return w / jnp.maximum(w.sum(1, keepdims=True), 1.0)


def hook_acts(model, tokens_BT: jax.Array, hook: str) -> jax.Array:
    """Activations [B, T, D] at `hook` (float32); for use inside a jit (the model stops at the hook's layer)."""
    from saeens.models import parse_hook

    layer, _ = parse_hook(hook)
    seen: dict[str, jax.Array] = {}

    def grab(name, x):
        if name == hook:
            seen[name] = x
        return x

    model.forward(tokens_BT, grab, stop_layer=layer)
    return seen[hook].astype(jnp.float32)


@partial(jax.jit, static_argnums=(0, 5, 6))
def _pool_batch(graphdef, state, ens: Ensemble | None, tokens_BT, mask_BT, hook: str, with_codes: bool):
    acts_BTD = hook_acts(nnx.merge(graphdef, state), tokens_BT, hook)
    w_BT = pool_weights(mask_BT)
    out = {"acts": jnp.einsum("bt,btd->bd", w_BT, acts_BTD)}
    if with_codes:
        B, T, D = acts_BTD.shape
        codes_BTF = ensemble.encode(ens, acts_BTD.reshape(B * T, D)).reshape(B, T, -1)
        out["codes"] = jnp.einsum("bt,btf->bf", w_BT, codes_BTF)
    return out


def check_inputs(model, ens: Ensemble | None, hook: str) -> None:
    """Refuse a hook the model lacks, or an ensemble trained on another model's width, before any model work."""
    from saeens.models import parse_hook

    parse_hook(hook, model.cfg.n_layers, model.cfg.parallel_residual)
    if ens is not None and ens.cfg.d_in != model.cfg.d_model:
        raise SaeensError(
            f"the ensemble has d_in={ens.cfg.d_in} but the model's width is {model.cfg.d_model}: "
            f"use the model its activations came from"
        )


def pooled(model, ens: Ensemble | None, hook: str, tokens_NT: np.ndarray, mask_NT: np.ndarray,
           batch_size: int = 16, progress: bool = False) -> dict[str, np.ndarray]:
    """Mean-pooled activations {"acts": [N, D]} and, with an ensemble, codes {"codes": [N, J*m]},
    over each row's real tokens except BOS (position 0). The last batch is padded to a full one
    (all-pad rows), so one program is compiled per (batch_size, T)."""
    from tqdm.auto import tqdm

    check_inputs(model, ens, hook)
    tokens_NT, mask_NT = np.asarray(tokens_NT, np.int32), np.asarray(mask_NT, bool)
    if tokens_NT.shape != mask_NT.shape or tokens_NT.ndim != 2:
        raise SaeensError(f"tokens {tokens_NT.shape} and mask {mask_NT.shape} must be the same [N, T] shape")
    N = tokens_NT.shape[0]
    graphdef, state = nnx.split(model)
    parts: dict[str, list[np.ndarray]] = {}
    for lo in tqdm(range(0, N, batch_size), disable=not progress, desc="pooling", unit="batch"):
        tok, msk = tokens_NT[lo : lo + batch_size], mask_NT[lo : lo + batch_size]
        n = tok.shape[0]
        if n < batch_size:
            tok = np.concatenate([tok, np.zeros((batch_size - n, tok.shape[1]), np.int32)])
            msk = np.concatenate([msk, np.zeros((batch_size - n, msk.shape[1]), bool)])
        out = _pool_batch(graphdef, state, ens, jnp.asarray(tok), jnp.asarray(msk), hook, ens is not None)
        out = jax.device_get(out)
        for k, v in out.items():
            parts.setdefault(k, []).append(np.asarray(v[:n], np.float32))
    if not parts:
        empty = {"acts": np.zeros((0, model.cfg.d_model), np.float32)}
        return empty if ens is None else {**empty, "codes": np.zeros((0, ens.width), np.float32)}
    return {k: np.concatenate(v) for k, v in parts.items()}


def pooled_codes(model, ens: Ensemble, hook: str, tokens_NT: np.ndarray, mask_NT: np.ndarray,
                 batch_size: int = 16) -> np.ndarray:
    """Mean-pooled ensemble codes [N, J*m] (BOS and padding skipped)."""
    return pooled(model, ens, hook, tokens_NT, mask_NT, batch_size)["codes"]


# ----------------------------------------------------------------------------- probes


@dataclasses.dataclass(frozen=True)
class LinearProbe:
    """A fitted logistic regression: logit(x) = ((x - mean) / scale) @ coef + intercept."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    @property
    def raw_weight(self) -> np.ndarray:
        """The weight vector in the unstandardised input space (d(logit)/dx)."""
        return self.coef / self.scale

    def decision(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.mean) / self.scale) @ self.coef + self.intercept

    def correct(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Per example: whether the probe's prediction is right (bool [N])."""
        return (self.decision(X) > 0) == np.asarray(y, bool)

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.correct(X, y)))


def fit_probe(X: np.ndarray, y: np.ndarray, *, C: float = 1.0, standardize: bool = True,
              max_iter: int = 1000) -> LinearProbe:
    """Binary L2 logistic regression (sklearn, lbfgs) of y (bool) on X."""
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X, np.float64)
    y = np.asarray(y, bool)
    if len(np.unique(y)) < 2:
        raise SaeensError("a probe needs examples of both classes: use more documents or other classes")
    mean = X.mean(0) if standardize else np.zeros(X.shape[1])
    scale = X.std(0) if standardize else np.ones(X.shape[1])
    scale = np.where(scale > 1e-12, scale, 1.0)
    clf = LogisticRegression(C=C, max_iter=max_iter).fit((X - mean) / scale, y)
    return LinearProbe(mean, scale, clf.coef_[0].astype(np.float64), float(clf.intercept_[0]))


def top_k_latents(codes_NF: np.ndarray, y_N: np.ndarray, k: int) -> np.ndarray:
    """The k latents with the largest |mean over positives - mean over negatives| (ties: lower index)."""
    codes_NF, y_N = np.asarray(codes_NF, np.float64), np.asarray(y_N, bool)
    diff_F = np.abs(codes_NF[y_N].mean(0) - codes_NF[~y_N].mean(0))
    return np.argsort(-diff_F, kind="stable")[:k]


def sparse_probe(codes_train: np.ndarray, y_train: np.ndarray, codes_test: np.ndarray, y_test: np.ndarray,
                 k: int, *, C: float = 1.0, standardize: bool = True, max_iter: int = 1000) -> float:
    """Test accuracy of a logistic regression on the top-k latents chosen on train."""
    return float(np.mean(sparse_probe_correct(codes_train, y_train, codes_test, y_test, k, C=C,
                                              standardize=standardize, max_iter=max_iter)))


def sparse_probe_correct(codes_train: np.ndarray, y_train: np.ndarray, codes_test: np.ndarray, y_test: np.ndarray,
                         k: int, *, C: float = 1.0, standardize: bool = True, max_iter: int = 1000) -> np.ndarray:
    """`sparse_probe` per test example (bool [N]): two SAEs probed on the same documents compare
    pairwise, which separates them where two accuracies' own intervals overlap."""
    idx = top_k_latents(codes_train, y_train, k)
    probe = fit_probe(np.asarray(codes_train)[:, idx], y_train, C=C, standardize=standardize, max_iter=max_iter)
    return probe.correct(np.asarray(codes_test)[:, idx], y_test)


def balanced_indices(y_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of all examples of the smaller side plus as many drawn (without replacement)
    from the larger side: positives and negatives in equal numbers."""
    y_N = np.asarray(y_N, bool)
    pos, neg = np.flatnonzero(y_N), np.flatnonzero(~y_N)
    n = min(len(pos), len(neg))
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


# ----------------------------------------------------------------------------- the eval


@dataclasses.dataclass(frozen=True)
class ProbingConfig:
    ks: tuple[int, ...] = (1, 2, 5)
    context_length: int = 128
    batch_size: int = 16
    max_train_per_class: int | None = 1000  # cap on documents of each class before balancing
    max_test_per_class: int | None = 250
    C: float = 1.0
    standardize: bool = True
    max_iter: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise SaeensError(f"ks must be positive latent counts, got {self.ks}: use e.g. (1, 2, 5)")
        if self.context_length < 2 or self.batch_size < 1:
            raise SaeensError("context_length must be >= 2 and batch_size >= 1")
        if self.C <= 0:
            raise SaeensError(f"C must be > 0, got {self.C}")


@dataclasses.dataclass(frozen=True)
class ProbeTaskResult:
    positive_class: str  # one-vs-rest: this class vs all others
    n_train: int  # balanced: half positives
    n_test: int
    llm_test_accuracy: float
    sae_test_accuracy: tuple[tuple[int, float], ...]  # (k, accuracy)
    top_latents: tuple[int, ...]  # the max(ks) latents chosen on train, best first
    # (k, "0110..."): per balanced test document in index order, 1 where the top-k probe is right; the
    # documents are the same for every SAE probed on the dataset, so two SAEs compare pairwise
    sae_test_correct: tuple[tuple[int, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sae_test_accuracy"] = {str(k): a for k, a in self.sae_test_accuracy}
        d["top_latents"] = list(self.top_latents)
        d["sae_test_correct"] = {str(k): bits for k, bits in self.sae_test_correct}
        return d


@dataclasses.dataclass(frozen=True)
class ProbingResult:
    dataset: str
    hook: str
    config: ProbingConfig
    counts: dict[str, dict[str, int]]  # documents per class and split (after the caps)
    tasks: tuple[ProbeTaskResult, ...]

    @property
    def llm_test_accuracy(self) -> float:
        return float(np.mean([t.llm_test_accuracy for t in self.tasks]))

    def sae_top_k_test_accuracy(self, k: int) -> float:
        return float(np.mean([dict(t.sae_test_accuracy)[k] for t in self.tasks]))

    def to_dict(self) -> dict[str, Any]:
        """SAEBench-style keys: llm_test_accuracy, sae_top_{k}_test_accuracy (means over tasks)."""
        return {
            "dataset": self.dataset,
            "hook": self.hook,
            "config": dataclasses.asdict(self.config),
            "counts": self.counts,
            "llm_test_accuracy": self.llm_test_accuracy,
            **{f"sae_top_{k}_test_accuracy": self.sae_top_k_test_accuracy(k) for k in self.config.ks},
            "tasks": [t.to_dict() for t in self.tasks],
        }


def probe_tasks(classes: Sequence[str]) -> tuple[str, ...]:
    """The positive class of each task: one-vs-rest, or the second class of a binary dataset."""
    return (classes[-1],) if len(classes) == 2 else tuple(classes)


def probe_pooled(classes: Sequence[str], labels_train: Sequence[str], acts_train: np.ndarray, codes_train: np.ndarray,
                 labels_test: Sequence[str], acts_test: np.ndarray, codes_test: np.ndarray,
                 cfg: ProbingConfig = ProbingConfig()) -> tuple[ProbeTaskResult, ...]:
    """All tasks on already pooled activations and codes (the model-free part of `run_probing`)."""
    labels_train, labels_test = np.asarray(labels_train), np.asarray(labels_test)
    kw = dict(C=cfg.C, standardize=cfg.standardize, max_iter=cfg.max_iter)
    out = []
    for ti, cls in enumerate(probe_tasks(classes)):
        rng = np.random.default_rng([cfg.seed, ti])
        tr = balanced_indices(labels_train == cls, rng)
        te = balanced_indices(labels_test == cls, rng)
        y_tr, y_te = labels_train[tr] == cls, labels_test[te] == cls
        if len(tr) == 0 or len(te) == 0:
            raise SaeensError(f"class {cls!r} has no train or test documents (or no others): use more documents")
        llm = fit_probe(acts_train[tr], y_tr, **kw).accuracy(acts_test[te], y_te)
        c_tr, c_te = codes_train[tr], codes_test[te]
        correct = {k: sparse_probe_correct(c_tr, y_tr, c_te, y_te, k, **kw) for k in cfg.ks}
        top = tuple(int(i) for i in top_k_latents(c_tr, y_tr, max(cfg.ks)))
        out.append(ProbeTaskResult(cls, len(tr), len(te), llm, tuple((k, float(np.mean(c))) for k, c in correct.items()),
                                   top, tuple((k, correct_to_bits(c)) for k, c in correct.items())))
    return tuple(out)


def correct_to_bits(correct_N: np.ndarray) -> str:
    """Per-document correctness as "0110...": a JSON string several times smaller than a list of booleans."""
    return "".join("1" if b else "0" for b in correct_N)


def correct_from_bits(bits: str) -> np.ndarray:
    """The inverse of `correct_to_bits`: a uint8 array of 0 and 1."""
    return np.frombuffer(bits.encode(), np.uint8) - ord("0")


def run_probing(model, tokenizer, ens: Ensemble, hook: str, dataset: LabelledDataset,
                cfg: ProbingConfig = ProbingConfig(), progress: bool = False) -> ProbingResult:
    """Sparse probing of `ens`'s codes at `hook` of `model` on `dataset` (see the module docstring)."""
    ds = dataset.subsample(cfg.max_train_per_class, cfg.max_test_per_class, cfg.seed)
    pooled_split = {}
    for split, docs in (("train", ds.train), ("test", ds.test)):
        if not docs:
            raise SaeensError(f"dataset {ds.name!r} has no {split} documents: use more documents")
        tok, mask = tokenize_texts(tokenizer, [d.text for d in docs], cfg.context_length)
        pooled_split[split] = pooled(model, ens, hook, tok, mask, cfg.batch_size, progress)
    tasks = probe_pooled(
        ds.classes,
        [d.label for d in ds.train], pooled_split["train"]["acts"], pooled_split["train"]["codes"],
        [d.label for d in ds.test], pooled_split["test"]["acts"], pooled_split["test"]["codes"],
        cfg,
    )
    return ProbingResult(ds.name, hook, cfg, ds.counts(), tasks)
