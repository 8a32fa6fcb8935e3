"""Every metric of the paper (shared PAPER.md, "Metrics") as pure jnp functions.

Three groups:
- per-batch functions of (x_BD, x_hat_BD, codes_BF): mse, explained_variance, ... They are the
  definitions, written the obvious way; use them on data that fits in memory.
- dictionary functions of decoders W_dec_FD (rows = features): diversity, stability,
  hungarian_stability, shared_latent_fraction. Cosines are computed in row blocks, so a 36k-feature
  dictionary never materialises an F x F matrix (except the Hungarian ones, which need it).
- a streaming accumulator (init_stats / update_stats / finalize, and evaluate_stream) that gives
  the per-batch metrics over ALL test tokens in one pass over a chunked activation cache, equal to
  the per-batch functions on the concatenated data (explained_variance_per_token excepted: it is
  centred per chunk, as SAELens centres per eval batch; see its docstring).

Shape suffixes: B tokens, D model dimension, F features (J*M for an ensemble), G features of a
second dictionary. Codes are "firing" where they are non-zero.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens is "dense"
COSINE_THRESHOLD = 0.7  # diversity / shared-latent threshold of the paper and Paulo & Belrose

# --------------------------------------------------------------------------------------------
# Per-batch metrics
# --------------------------------------------------------------------------------------------


def mse(x_BD: jax.Array, x_hat_BD: jax.Array) -> jax.Array:
    """Per-token squared error summed over d, mean over tokens (the training loss's scale)."""
    return jnp.mean(jnp.sum((x_BD - x_hat_BD) ** 2, axis=-1))


def _ev_from_sse_sst(sse_D: jax.Array, sst_D: jax.Array) -> jax.Array:
    """mean_d (1 - SSE_d/SST_d) over the dimensions that vary (a constant one has nothing to explain)."""
    varies_D = sst_D > 0
    ratio_D = jnp.where(varies_D, sse_D / jnp.where(varies_D, sst_D, 1.0), 0.0)
    return 1.0 - jnp.sum(ratio_D) / jnp.sum(varies_D)


def _centred(x_BD: jax.Array) -> jax.Array:
    """x - mean_over_tokens(x), with the mean taken of x - x[0] so a large common offset cancels exactly."""
    y_BD = x_BD - x_BD[:1]
    return y_BD - y_BD.mean(0)


def explained_variance(x_BD: jax.Array, x_hat_BD: jax.Array) -> jax.Array:
    """The paper's EV: per dimension 1 - SSE_d/SST_d over the tokens, averaged over d.

    SST_d is centred on the per-dimension mean (two-pass, shifted), so a large common offset in
    the activations does not cancel catastrophically. Dimensions with zero variance are skipped.
    """
    x_BD = jnp.asarray(x_BD, jnp.float32)
    sse_D = jnp.sum((x_BD - x_hat_BD) ** 2, axis=0)
    sst_D = jnp.sum(_centred(x_BD) ** 2, axis=0)
    return _ev_from_sse_sst(sse_D, sst_D)


def explained_variance_per_token(x_BD: jax.Array, x_hat_BD: jax.Array) -> jax.Array:
    """SAELens' per-token EV ("explained_variance_legacy" in sae_lens>=6, "explained_variance" in 5.x).

    mean over tokens t of 1 - ||x_t - x_hat_t||^2 / ||x_t - mean_batch(x)||^2, where mean_batch is
    the per-DIMENSION mean over this batch's tokens (not a mean over d). It depends on the batch:
    streamed, each chunk is centred on its own mean, as SAELens centres each eval batch.
    (sae_lens>=6 reports as "explained_variance" the pooled 1 - sum SSE / sum SST: see
    `explained_variance_pooled`; the paper's is `explained_variance`.)
    """
    x_BD = jnp.asarray(x_BD, jnp.float32)
    sse_B = jnp.sum((x_BD - x_hat_BD) ** 2, axis=-1)
    sst_B = jnp.sum(_centred(x_BD) ** 2, axis=-1)
    return jnp.mean(1.0 - sse_B / sst_B)


def explained_variance_pooled(x_BD: jax.Array, x_hat_BD: jax.Array) -> jax.Array:
    """1 - sum_d SSE_d / sum_d SST_d: sae_lens>=6's "explained_variance" (dominated by high-variance dims)."""
    x_BD = jnp.asarray(x_BD, jnp.float32)
    return 1.0 - jnp.sum((x_BD - x_hat_BD) ** 2) / jnp.sum(_centred(x_BD) ** 2)


def fvu(x_BD: jax.Array, x_hat_BD: jax.Array) -> jax.Array:
    """Fraction of variance unexplained = 1 - explained_variance (the paper's, per-dimension)."""
    return 1.0 - explained_variance(x_BD, x_hat_BD)


def firing(codes_BF: jax.Array) -> jax.Array:
    """Boolean firing matrix Z: a code fires where it is non-zero."""
    return codes_BF != 0


def l0(codes_BF: jax.Array) -> jax.Array:
    """Mean number of non-zero codes per token (for an ensemble: the sum of the members' L0)."""
    return jnp.mean(jnp.sum(firing(codes_BF), axis=-1, dtype=jnp.float32))


def relative_reconstruction_bias(x_BD: jax.Array, x_hat_BD: jax.Array) -> jax.Array:
    """gamma = E||x_hat||^2 / E[x . x_hat] (Gated SAE paper, Eq. 10); gamma < 1 means shrinkage."""
    return jnp.mean(jnp.sum(x_hat_BD**2, axis=-1)) / jnp.mean(jnp.sum(x_BD * x_hat_BD, axis=-1))


def firing_rate(codes_BF: jax.Array) -> jax.Array:
    """Per-feature fraction of tokens on which it fires [F]."""
    return jnp.mean(firing(codes_BF), axis=0, dtype=jnp.float32)


def dead_fraction(codes_BF: jax.Array) -> jax.Array:
    """Fraction of features that never fire on these tokens: capacity the SAE does not use."""
    return jnp.mean(~jnp.any(firing(codes_BF), axis=0))


def dense_fraction(codes_BF: jax.Array, threshold: float = DENSE_THRESHOLD) -> jax.Array:
    """Fraction of features firing on more than `threshold` (10%) of tokens: rarely interpretable."""
    return jnp.mean(firing_rate(codes_BF) > threshold)


def cofiring(codes_BF: jax.Array) -> jax.Array:
    """Boolean [F, F]: features i and j fire together on at least one token (Z^T Z > 0)."""
    Z_BF = firing(codes_BF).astype(jnp.float32)
    return (Z_BF.T @ Z_BF) > 0


def connectivity(codes_BF: jax.Array) -> jax.Array:
    """1 - nnz(Z^T Z)/F^2: how few feature pairs ever co-fire (1 = none, 0 = all do)."""
    F = codes_BF.shape[-1]
    return 1.0 - jnp.sum(cofiring(codes_BF), dtype=jnp.float32) / (F * F)


# --------------------------------------------------------------------------------------------
# Dictionary metrics
# --------------------------------------------------------------------------------------------


def normalize_rows(W_FD: jax.Array) -> jax.Array:
    """Unit-norm rows (features are unit norm already; this makes cosines exact anyway). Zero rows stay 0."""
    W_FD = jnp.asarray(W_FD, jnp.float32)
    return W_FD / jnp.maximum(jnp.linalg.norm(W_FD, axis=-1, keepdims=True), 1e-12)


@partial(jax.jit, static_argnames=("exclude_self", "block_size"))
def max_cosine(
    A_FD: jax.Array, B_GD: jax.Array, exclude_self: bool = False, block_size: int = 4096
) -> jax.Array:
    """For each row of A, its largest cosine to any row of B [F], computed in blocks of A's rows.

    exclude_self (A and B the same dictionary): skip only the diagonal, so an exact duplicate of
    a feature still counts. Memory is block_size x G, never F x G.
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
        return jnp.max(cos_bG, axis=-1)

    return jax.lax.map(one_block, (jnp.arange(n_blocks), A_NbD)).reshape(-1)[:F]


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


def stability_scores(decoders: Sequence[jax.Array], block_size: int = 4096) -> np.ndarray:
    """Per run r: mean over its features of max(0, max cosine to the union of the OTHER runs' features) [R]."""
    if len(decoders) < 2:
        raise ValueError(f"stability needs at least 2 independent runs, got {len(decoders)}")
    scores = []
    for r, W_FD in enumerate(decoders):
        others_GD = jnp.concatenate([jnp.asarray(W) for s, W in enumerate(decoders) if s != r])
        best_F = max_cosine(W_FD, others_GD, block_size=block_size)
        scores.append(float(jnp.mean(jnp.maximum(best_F, 0.0))))
    return np.asarray(scores)


def stability(
    decoders: Sequence[jax.Array], confidence: float = 0.95, block_size: int = 4096
) -> dict[str, Any]:
    """The paper's stability: do independent runs (disjoint seeds) find the same features?

    decoders: one concatenated dictionary [F_r, D] per independently trained ensemble (or SAE).
    Returns mean_ci of the per-run scores (see `stability_scores`): "scores", "mean", "ci_low",
    "ci_high", "ci_half_width" (Student t with R-1 degrees of freedom).
    """
    return mean_ci(stability_scores(decoders, block_size), confidence)


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


# --------------------------------------------------------------------------------------------
# Streaming: all test tokens, one pass
# --------------------------------------------------------------------------------------------

_SUM_KEYS = ("sse_D", "xhat_sq", "x_dot_xhat", "ev_tok", "l0")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Stats:
    """Running sums for the per-batch metrics over a stream of chunks (a pytree; see update_stats).

    shift_D: the first chunk's mean, subtracted from every chunk; mean_D / m2_D: per-dimension
    mean of (x - shift) and sum of squared deviations, merged chunk by chunk with Chan et al.'s
    formula (each chunk centred two-pass). Shifted values are small, so the means are stored
    precisely and SST stays accurate in float32 even when activations share a large offset.
    sums: Kahan-compensated float32 sums (comp holds the compensations). fire_F and n_tokens are
    int32 (up to 2^31 tokens). cofire_FF: OR of (Z^T Z > 0) over chunks, or None when turned off.
    """

    n_tokens: jax.Array  # int32 []
    shift_D: jax.Array
    mean_D: jax.Array
    m2_D: jax.Array
    sums: dict[str, jax.Array]
    comp: dict[str, jax.Array]
    fire_F: jax.Array  # int32 [F], tokens on which each feature fired
    cofire_FF: jax.Array | None


def init_stats(d_in: int, n_features: int, cofire: bool = True) -> Stats:
    """Empty accumulator. cofire=False skips the [F, F] co-firing matrix, so connectivity is NaN.

    With co-firing on, memory is F^2 bytes for the matrix plus a float32 F x F product per chunk
    (F = 16k: 0.27 + 1 GB; F = 36k: 1.3 + 5.2 GB): turn it off for wide ensembles on small devices.
    """
    sums = {k: jnp.zeros((d_in,) if k.endswith("_D") else (), jnp.float32) for k in _SUM_KEYS}
    return Stats(
        n_tokens=jnp.zeros((), jnp.int32),
        shift_D=jnp.zeros((d_in,), jnp.float32),
        mean_D=jnp.zeros((d_in,), jnp.float32),
        m2_D=jnp.zeros((d_in,), jnp.float32),
        sums=sums,
        comp=jax.tree.map(jnp.zeros_like, sums),
        fire_F=jnp.zeros((n_features,), jnp.int32),
        cofire_FF=jnp.zeros((n_features, n_features), bool) if cofire else None,
    )


def _kahan_add(total: jax.Array, comp: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y = x - comp
    t = total + y
    return t, (t - total) - y


def update_stats(stats: Stats, x_BD: jax.Array, x_hat_BD: jax.Array, codes_BF: jax.Array) -> Stats:
    """Fold one non-empty chunk into the running sums (pure; `update_stats_jit` is it jitted, donating)."""
    x_BD = jnp.asarray(x_BD, jnp.float32)
    x_hat_BD = jnp.asarray(x_hat_BD, jnp.float32)
    B = x_BD.shape[0]
    err_BD = x_BD - x_hat_BD
    sse_B = jnp.sum(err_BD**2, axis=-1)
    Z_BF = firing(codes_BF)

    # Chan et al. parallel merge of (n, mean, M2) of y = x - shift, shift = the first chunk's mean
    shift_D = jnp.where(stats.n_tokens == 0, (x_BD - x_BD[:1]).mean(0) + x_BD[0], stats.shift_D)
    y_BD = x_BD - shift_D
    chunk_mean_D = y_BD.mean(0)
    centred_BD = y_BD - chunk_mean_D
    chunk_m2_D = jnp.sum(centred_BD**2, axis=0)
    n_a = stats.n_tokens.astype(jnp.float32)
    n = n_a + B
    delta_D = chunk_mean_D - stats.mean_D
    mean_D = stats.mean_D + delta_D * (B / n)
    m2_D = stats.m2_D + chunk_m2_D + delta_D**2 * (n_a * B / n)

    chunk = {
        "sse_D": jnp.sum(err_BD**2, axis=0),
        "xhat_sq": jnp.sum(x_hat_BD**2),
        "x_dot_xhat": jnp.sum(x_BD * x_hat_BD),
        "ev_tok": jnp.sum(1.0 - sse_B / jnp.sum(centred_BD**2, axis=-1)),
        "l0": jnp.sum(Z_BF, dtype=jnp.float32),
    }
    pairs = {k: _kahan_add(stats.sums[k], stats.comp[k], chunk[k]) for k in _SUM_KEYS}

    cofire_FF = stats.cofire_FF
    if cofire_FF is not None:
        Zf_BF = Z_BF.astype(jnp.float32)
        cofire_FF = cofire_FF | ((Zf_BF.T @ Zf_BF) > 0)
    return Stats(
        n_tokens=stats.n_tokens + B,
        shift_D=shift_D,
        mean_D=mean_D,
        m2_D=m2_D,
        sums={k: p[0] for k, p in pairs.items()},
        comp={k: p[1] for k, p in pairs.items()},
        fire_F=stats.fire_F + jnp.sum(Z_BF, axis=0, dtype=jnp.int32),
        cofire_FF=cofire_FF,
    )


@partial(jax.jit, static_argnames=("dense_threshold",))
def _finalize_arrays(stats: Stats, dense_threshold: float) -> dict[str, jax.Array]:
    n = stats.n_tokens.astype(jnp.float32)
    s = stats.sums
    ev = _ev_from_sse_sst(s["sse_D"], stats.m2_D)
    F = stats.fire_F.shape[0]
    if stats.cofire_FF is None:
        conn = jnp.float32(jnp.nan)
    else:
        conn = 1.0 - jnp.sum(stats.cofire_FF, dtype=jnp.float32) / (F * F)
    return {
        "mse": jnp.sum(s["sse_D"]) / n,
        "explained_variance": ev,
        "explained_variance_per_token": s["ev_tok"] / n,
        "fvu": 1.0 - ev,
        "l0": s["l0"] / n,
        "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"],
        "dead_fraction": jnp.mean(stats.fire_F == 0),
        "dense_fraction": jnp.mean(stats.fire_F.astype(jnp.float32) / n > dense_threshold),
        "connectivity": conn,
    }


def finalize(stats: Stats, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, float]:
    """The metrics over every token seen: mse, explained_variance (paper's, per-dimension),
    explained_variance_per_token (SAELens', chunk-centred), fvu, l0, relative_reconstruction_bias,
    dead_fraction, dense_fraction, connectivity (NaN without co-firing), n_tokens."""
    result = {k: float(v) for k, v in _finalize_arrays(stats, dense_threshold).items()}
    result["n_tokens"] = int(stats.n_tokens)
    return result


update_stats_jit = jax.jit(update_stats, donate_argnums=0)
"""update_stats compiled, the old stats donated (updated in place): what evaluate_stream calls."""


def evaluate_stream(
    forward_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    chunks: Iterable[np.ndarray],
    n_features: int,
    *,
    cofire: bool = True,
    progress: bool = False,
    total: int | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
) -> dict[str, float]:
    """Every per-token metric over a chunked stream of activations, in one pass.

    forward_fn(x_BD) -> (x_hat_BD, codes_BF), e.g. functools.partial(saeens.ensemble.forward, ens);
    it is jitted here (a partial's arrays become jit arguments, not baked-in constants). chunks:
    an iterable of [n, d] arrays (a last, shorter chunk costs one more compile). total: the number
    of chunks, for the progress bar only. Returns `finalize`'s dict.
    """
    fwd = jax.jit(forward_fn)
    it: Iterable[np.ndarray] = chunks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, total=total, desc="evaluate", unit="chunk")
    stats: Stats | None = None
    for x in it:
        x_BD = jnp.asarray(x, jnp.float32)
        if x_BD.ndim != 2:
            raise ValueError(f"activation chunks must be [n, d_in], got shape {tuple(x_BD.shape)}")
        if stats is None:
            stats = init_stats(x_BD.shape[1], n_features, cofire=cofire)
        elif x_BD.shape[1] != stats.mean_D.shape[0]:
            raise ValueError(f"chunk has d_in={x_BD.shape[1]}, earlier chunks had {stats.mean_D.shape[0]}")
        if x_BD.shape[0] == 0:
            continue
        x_hat_BD, codes_BF = fwd(x_BD)
        if codes_BF.shape[-1] != n_features:
            raise ValueError(f"forward_fn gave {codes_BF.shape[-1]} codes per token, n_features={n_features}")
        stats = update_stats_jit(stats, x_BD, x_hat_BD, codes_BF)
    if stats is None or int(stats.n_tokens) == 0:
        raise ValueError("evaluate_stream got no activations: the chunk iterable was empty")
    return finalize(stats, dense_threshold)
