"""Per-batch metrics of (x_BD, x_hat_BD, codes_BF): the definitions, written the obvious way.

Use them on data that fits in memory; metrics/stream.py gives the same numbers over a whole
chunked split in one pass. Shape suffixes: B tokens, D model dimension, F features (J*M for an
ensemble). A code "fires" where it is non-zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens is "dense"


def mse(x_BD: jax.Array, x_hat_BD: jax.Array) -> jax.Array:
    """Per-token squared error summed over d, mean over tokens (the training loss's scale)."""
    return jnp.mean(jnp.sum((x_BD - x_hat_BD) ** 2, axis=-1))


def ev_from_sse_sst(sse_D: jax.Array, sst_D: jax.Array) -> jax.Array:
    """mean_d (1 - SSE_d/SST_d) over the dimensions that vary (a constant one has nothing to explain)."""
    varies_D = sst_D > 0
    ratio_D = jnp.where(varies_D, sse_D / jnp.where(varies_D, sst_D, 1.0), 0.0)
    return 1.0 - jnp.sum(ratio_D) / jnp.sum(varies_D)


def pooled_ev_from_sse_sst(sse_D: jax.Array, sst_D: jax.Array) -> jax.Array:
    """1 - sum_d SSE_d / sum_d SST_d (variance-weighted: dominated by the high-variance dimensions)."""
    return 1.0 - jnp.sum(sse_D) / jnp.sum(sst_D)


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
    return ev_from_sse_sst(sse_D, sst_D)


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
    return pooled_ev_from_sse_sst(jnp.sum((x_BD - x_hat_BD) ** 2, axis=0), jnp.sum(_centred(x_BD) ** 2, axis=0))


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
