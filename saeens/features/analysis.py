"""Everything a dashboard shows about one run's features, as one JSON-ready record.

`analyse` puts the parts together: agreement across members and other runs (weights only), the one
streaming pass (`feature_pass`: per-feature statistics and the full / consensus metrics), the
text of the top contexts (`top_contexts`) and, with a model, the logit effects.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from saeens import ensemble, metrics
from saeens.data.cache import ActivationCache
from saeens.data.outliers import KeptRows, kept_view
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.features.agreement import consensus_keep, member_matches, run_matches
from saeens.features.contexts import token_decoder, top_contexts
from saeens.features.logits import logit_effects
from saeens.features.stats import even_chunks, feature_pass, hist_edges


@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
    split: str = "test"
    top_n: int = 10  # top activating rows kept per feature
    before: int = 16  # tokens shown before an activating token (within its context)
    after: int = 4
    consensus_t: int | None = None  # features kept by the consensus ensemble: found by >= t members (None: min(2, J))
    select: int | None = None  # keep only this many features in the output (see `select_features`)
    logit_k: int = 10
    chunk_rows: int = 2048


def select_features(frequency_F: np.ndarray, consensus_F: np.ndarray, n: int | None) -> np.ndarray:
    """The features a dashboard shows: all of them (n None), else n firing features, those that fire
    on at most 10% of tokens first (dense features are rarely interpretable; they follow only when
    fewer than n others fire), each group ordered by descending consensus count, then by descending
    frequency (ties: lower index first)."""
    if n is None:
        return np.arange(frequency_F.shape[0])
    fired = np.flatnonzero(frequency_F > 0)
    dense = frequency_F[fired] > metrics.DENSE_THRESHOLD
    return fired[np.lexsort((-frequency_F[fired], -consensus_F[fired], dense))][:n]


def _trimmed_hist(counts_K: np.ndarray) -> dict[str, Any]:
    """The histogram from its first to its last non-empty bin: hist_lo (that first bin's index), hist."""
    nz = np.flatnonzero(counts_K)
    lo, hi = (int(nz[0]), int(nz[-1]) + 1) if nz.size else (0, 0)
    return {"hist_lo": lo, "hist": counts_K[lo:hi].tolist()}


def analyse(ens: Ensemble, info: dict[str, Any], acts: ActivationCache, others: list[tuple[str, jax.Array]],
            cfg: FeaturesConfig = FeaturesConfig(), model: Any = None, tokenizer: Any = None,
            progress: bool = True) -> dict[str, Any]:
    """The record of one run: run-level facts, "consensus" (t, kept count, metrics of the full and the
    consensus ensemble side by side) and "features": one dict per selected feature.

    info: the run's metadata (name, method, ...); others: (name, concatenated decoder) of the runs to
    match against (stability is the fraction of them holding a match)."""
    if acts.d_in != ens.cfg.d_in:
        raise SaeensError(f"the run expects d_in={ens.cfg.d_in} but the activations have d_in={acts.d_in}: use the run's cache")
    if acts.n_rows(cfg.split) == 0:
        raise SaeensError(f"the activation cache has no {cfg.split!r} rows: pass --split train or all")
    J, M = ens.n_members, ens.cfg.width
    t = min(2, J) if cfg.consensus_t is None else cfg.consensus_t
    mm = member_matches(ens)
    rm = run_matches(ens, [W for _, W in others])
    keep_F = consensus_keep(mm["consensus"], t, J)
    kept = kept_view(acts)  # flagged massive-activation rows are neither counted nor shown
    chunks = even_chunks(kept.chunks(cfg.split, cfg.chunk_rows), cfg.chunk_rows)
    st = feature_pass(ens, chunks, keep_F, cfg.top_n, kept.n_rows(cfg.split), progress)
    if isinstance(kept, KeptRows):  # top rows back to the cache's rows (its row <-> text layout)
        st["top_row"] = kept.original(st["top_row"], cfg.split)
    dec_FD = ensemble.decoder(ens)
    sel_S = select_features(st["frequency"], mm["consensus"], cfg.select)
    ctx = top_contexts(ens, acts, cfg.split, sel_S, st["top_row"][sel_S], st["top_value"][sel_S], tokenizer,
                       cfg.before, cfg.after)
    logits = logit_effects(model, dec_FD[sel_S], cfg.logit_k) if model is not None else None
    decode = token_decoder(tokenizer)
    role = "stage" if ens.sequential else "member"
    features = []
    for s, f in enumerate(sel_S):
        feat = {
            "id": int(f), role: int(f // M), "latent": int(f % M),
            "frequency": float(st["frequency"][f]), "mean_act": float(st["mean_act"][f]),
            "max_act": float(st["max_act"][f]), "consensus": int(mm["consensus"][f]),
            "kept": bool(keep_F[f]),
            "stability": None if not others else float(rm["stability"][f]),
            "members": [{role: j, "dec_latent": int(mm["dec_latent"][f, j]), "dec_cos": round(float(mm["dec_cos"][f, j]), 4),
                         "enc_latent": int(mm["enc_latent"][f, j]), "enc_cos": round(float(mm["enc_cos"][f, j]), 4)}
                        for j in range(J)],
            "runs": [{"run": name, "feature": int(rm["feature"][f, r]), "cos": round(float(rm["cos"][f, r]), 4)}
                     for r, (name, _) in enumerate(others)],
            **_trimmed_hist(st["hist"][f]),
            "contexts": ctx[s],
        }
        if logits is not None:
            feat["logits"] = {side: [[decode(int(i)), round(float(v), 4)]
                                     for i, v in zip(logits[f"{side}_ids"][s], logits[side][s])]
                              for side in ("promoted", "suppressed")}
        features.append(feat)
    cons = {"t": t, "kept": int(keep_F.sum()), "of": J * M, "kept_features": np.flatnonzero(keep_F).tolist(),
            "metrics_full": st["metrics_full"],
            "metrics_consensus": st["metrics_consensus"]}
    cons["metrics_full"]["diversity"] = int(metrics.diversity(dec_FD))
    cons["metrics_consensus"]["diversity"] = int(metrics.diversity(dec_FD[np.flatnonzero(keep_F)])) if keep_F.any() else 0
    return {
        **info, "role": role, "members": J, "width": M, "arch": ens.cfg.arch, "n_features": J * M,
        "split": cfg.split, "n_tokens": st["n_tokens"], "pass_seconds": round(st["seconds"], 3),
        "tokens_per_second": round(st["tokens_per_second"], 1), "other_runs": [name for name, _ in others],
        "selection": "all features" if cfg.select is None else
        f"{cfg.select} features firing on at most {metrics.DENSE_THRESHOLD:.0%} of tokens: highest consensus, then most frequent",
        "hist_edges": [float(e) for e in hist_edges()], "consensus": cons, "features": features,
    }
