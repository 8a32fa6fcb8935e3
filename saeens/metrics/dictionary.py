"""Dictionary metrics of decoders W_dec_FD (rows = features): cosines, diversity, stability
(mean-max cosine and the Hungarian variant), shared latents, and the confidence interval they use.

Cosines are computed in row blocks, so a 36k-feature dictionary never materialises an F x F
matrix (except the Hungarian ones, which need it). G: features of a second dictionary.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

COSINE_THRESHOLD = 0.7  # diversity / shared-latent threshold (the paper's, and Paulo & Belrose's)


def normalize_rows(W_FD: jax.Array) -> jax.Array:
    """Unit-norm rows (features are unit norm already; this makes cosines exact anyway). Zero rows stay 0."""
    W_FD = jnp.asarray(W_FD, jnp.float32)
    return W_FD / jnp.maximum(jnp.linalg.norm(W_FD, axis=-1, keepdims=True), 1e-12)


@partial(jax.jit, static_argnames=("exclude_self", "block_size"))
def best_match(
    A_FD: jax.Array, B_GD: jax.Array, exclude_self: bool = False, block_size: int = 4096
) -> tuple[jax.Array, jax.Array]:
    """For each row of A: (index of the row of B with the largest cosine [F] int32, that cosine [F]),
    computed in blocks of A's rows, so memory is block_size x G, never F x G.

    exclude_self (A and B the same dictionary): skip only the diagonal, so an exact duplicate of
    a feature still counts.
    """
    A_FD, B_GD = normalize_rows(A_FD), normalize_rows(B_GD)
    F, D = A_FD.shape
    bs = min(block_size, F)
    n_blocks = -(-F // bs)
    A_NbD = jnp.pad(A_FD, ((0, n_blocks * bs - F), (0, 0))).reshape(n_blocks, bs, D)

    def one_block(args):
        i, A_bD = args
        cos_bG = A_bD @ B_GD.T
        if exclude_self:
            rows_b1 = (i * bs + jnp.arange(bs))[:, None]
            cos_bG = jnp.where(rows_b1 == jnp.arange(B_GD.shape[0])[None, :], -jnp.inf, cos_bG)
        return jnp.argmax(cos_bG, axis=-1).astype(jnp.int32), jnp.max(cos_bG, axis=-1)

    idx_NB, cos_NB = jax.lax.map(one_block, (jnp.arange(n_blocks), A_NbD))
    return idx_NB.reshape(-1)[:F], cos_NB.reshape(-1)[:F]


def max_cosine(
    A_FD: jax.Array, B_GD: jax.Array, exclude_self: bool = False, block_size: int = 4096
) -> jax.Array:
    """For each row of A, its largest cosine to any row of B [F] (`best_match`'s cosine)."""
    return best_match(A_FD, B_GD, exclude_self, block_size)[1]


def diversity(W_dec_FD: jax.Array, threshold: float = COSINE_THRESHOLD, block_size: int = 4096) -> jax.Array:
    """Number of features whose cosine to EVERY other feature is below `threshold` (paper: 0.7).

    Counts the features the dictionary holds only once: an ensemble of near-copies scores low.
    Pass the concatenated ensemble dictionary (`ensemble.decoder(ens)`).
    """
    return jnp.sum(max_cosine(W_dec_FD, W_dec_FD, exclude_self=True, block_size=block_size) < threshold)


def diversity_fraction(W_dec_FD: jax.Array, threshold: float = COSINE_THRESHOLD, block_size: int = 4096) -> jax.Array:
    """`diversity` divided by the number of features."""
    return diversity(W_dec_FD, threshold, block_size) / W_dec_FD.shape[0]


def mean_ci(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """Mean and a Student-t confidence interval (few runs: the normal 1.96 would be too narrow).

    NaN bounds with fewer than two values.
    """
    from scipy import stats as sps

    v = np.asarray(values, np.float64)
    mean = float(v.mean()) if v.size else float("nan")
    if v.size < 2:
        half = float("nan")
    else:
        half = float(sps.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size))
    return {
        "scores": v.tolist(),
        "mean": mean,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "ci_half_width": half,
        "confidence": confidence,
    }


def max_cosines_to_others(decoders: Sequence[jax.Array], block_size: int = 4096) -> list[np.ndarray]:
    """Per run r: each of its features' max cosine to the union of the OTHER runs' features [F_r]
    (what stability averages; `stability_per_member` splits it by member)."""
    if len(decoders) < 2:
        raise ValueError(f"stability needs at least 2 independent runs, got {len(decoders)}")
    out = []
    for r, W_FD in enumerate(decoders):
        others_GD = jnp.concatenate([jnp.asarray(W) for s, W in enumerate(decoders) if s != r])
        out.append(np.asarray(max_cosine(W_FD, others_GD, block_size=block_size), np.float32))
    return out


def stability_scores(decoders: Sequence[jax.Array], block_size: int = 4096) -> np.ndarray:
    """Per run r: mean over its features of max(0, max cosine to the union of the OTHER runs' features) [R]."""
    return np.asarray(stability_of_best(max_cosines_to_others(decoders, block_size))["scores"])


def stability_per_member(best_per_run: Sequence[np.ndarray], members: int) -> np.ndarray:
    """[R, J]: each run's stability over each member's (boosting: each stage's) features alone, from
    `max_cosines_to_others` of runs whose features are J equal blocks in member order. Every feature
    searches the same other runs, so each block's chance level is the whole run's; a block near it
    holds features that the other runs did not find."""
    return np.stack([np.maximum(np.asarray(best_F, np.float32), 0.0).reshape(members, -1).mean(1, dtype=np.float64)
                     for best_F in best_per_run])  # reshape raises unless the features split evenly


def stability(
    decoders: Sequence[jax.Array], confidence: float = 0.95, block_size: int = 4096, members: int = 1
) -> dict[str, Any]:
    """The paper's stability: do independent runs (disjoint seeds) find the same features?

    decoders: one concatenated dictionary [F_r, D] per independently trained ensemble (or SAE).
    Returns mean_ci of the per-run scores (see `stability_scores`): "scores", "mean", "ci_low",
    "ci_high", "ci_half_width" (Student t with R-1 degrees of freedom); with members > 1, also
    "per_member" (`stability_of_best`).
    """
    return stability_of_best(max_cosines_to_others(decoders, block_size), confidence, members)


def stability_of_best(best_per_run: Sequence[np.ndarray], confidence: float = 0.95, members: int = 1
                      ) -> dict[str, Any]:
    """`stability` from each run's `max_cosines_to_others` vector (e.g. kept on disk instead of the
    decoders). members > 1 (an ensemble's member count) adds "per_member": the mean over runs of
    `stability_per_member`, which shows, e.g., which of boosting's stages the other runs reproduce."""
    out = mean_ci([np.maximum(np.asarray(b, np.float32), 0.0).mean(dtype=np.float64) for b in best_per_run],
                  confidence)
    if members > 1:
        out["per_member"] = stability_per_member(best_per_run, members).mean(0).tolist()
    return out


def random_decoders(counts: Sequence[int], d_in: int, seed: int = 0) -> list[np.ndarray]:
    """Random unit vectors (isotropic Gaussian, normalised), one [F_r, d_in] set per count, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for F in counts:
        W_FD = rng.standard_normal((int(F), int(d_in))).astype(np.float32)
        out.append(W_FD / np.linalg.norm(W_FD, axis=1, keepdims=True))
    return out


def stability_chance(counts: Sequence[int], d_in: int, seed: int = 0, hungarian: bool = False,
                     block_size: int = 4096) -> dict[str, float]:
    """Stability's chance level: the same computation on random unit vectors of the same counts.

    Max cosines grow with the number of vectors searched, so runs of more features (an ensemble of
    J members against R - 1 other runs) score higher by chance alone: a stability figure is only
    comparable across methods beside this level, or as a ratio over it (`over_chance`)."""
    random = random_decoders(counts, d_in, seed)
    out = {"stability": float(stability_scores(random, block_size).mean())}
    if hungarian:
        out["hungarian_stability"] = float(hungarian_stability(random)["mean"])
    return out


def over_chance(value: float, chance: float) -> float:
    """value / chance (NaN when the chance level is not positive)."""
    return float(value) / float(chance) if chance > 0 else float("nan")


def cosine_matrix(A_FD: jax.Array, B_GD: jax.Array) -> np.ndarray:
    """Dense [F, G] cosines as float64 NumPy (for the Hungarian solver; F x G memory)."""
    return np.asarray(normalize_rows(A_FD) @ normalize_rows(B_GD).T, np.float64)


def hungarian_match(A_FD: jax.Array, B_GD: jax.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact one-to-one matching maximising the summed cosine: (rows of A, their rows of B, cosines)."""
    from scipy.optimize import linear_sum_assignment

    cos_FG = cosine_matrix(A_FD, B_GD)
    rows, cols = linear_sum_assignment(cos_FG, maximize=True)
    return rows, cols, cos_FG[rows, cols]


def hungarian_stability(decoders: Sequence[jax.Array], confidence: float = 0.95) -> dict[str, Any]:
    """One-to-one variant of stability: mean cosine of the optimal matching between two runs.

    Not floored at 0 (a bad match counts as bad). With R > 2 runs every pair is matched; "mean" is
    the mean over pairs and the interval is a Student t over the pair scores ("scores"); pairs share
    runs, so it is optimistic. One pair gives NaN bounds. Needs an F x G float64 matrix per pair and
    O(F^3) time: fine at 16k features on a workstation, slow on a laptop.
    """
    if len(decoders) < 2:
        raise ValueError(f"hungarian_stability needs at least 2 runs, got {len(decoders)}")
    pair_scores = [
        float(hungarian_match(decoders[a], decoders[b])[2].mean())
        for a, b in itertools.combinations(range(len(decoders)), 2)
    ]
    out = mean_ci(pair_scores, confidence)
    out["pairs"] = [list(p) for p in itertools.combinations(range(len(decoders)), 2)]
    return out


def shared_latent_fraction(
    enc_a_FD: jax.Array,
    dec_a_FD: jax.Array,
    enc_b_GD: jax.Array,
    dec_b_GD: jax.Array,
    threshold: float = COSINE_THRESHOLD,
) -> float:
    """Paulo & Belrose's shared latents: fraction of A's latents whose Hungarian match in B is the
    SAME latent on the encoder vectors and on the decoder vectors, with both cosines >= threshold.

    Encoder vectors are rows: pass params["W_enc"].T (SAELens stores W_enc as [D, F]).
    """
    for name, enc, dec in (("a", enc_a_FD, dec_a_FD), ("b", enc_b_GD, dec_b_GD)):
        if enc.shape != dec.shape:
            raise ValueError(
                f"run {name}: encoder {tuple(enc.shape)} and decoder {tuple(dec.shape)} differ: "
                "pass encoder vectors as rows [F, D] (W_enc.T) and the decoder as [F, D]"
            )
    F = enc_a_FD.shape[0]
    rows_e, cols_e, cos_e = hungarian_match(enc_a_FD, enc_b_GD)
    rows_d, cols_d, cos_d = hungarian_match(dec_a_FD, dec_b_GD)
    match_e, match_d = np.full(F, -1), np.full(F, -2)
    best_e, best_d = np.zeros(F), np.zeros(F)
    match_e[rows_e], best_e[rows_e] = cols_e, cos_e
    match_d[rows_d], best_d[rows_d] = cols_d, cos_d
    shared = (match_e == match_d) & (best_e >= threshold) & (best_d >= threshold)
    return float(shared.mean())
