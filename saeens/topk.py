"""Exact TopK and BatchTopK selection, cheap on CPU: block maxima prune the candidates first.

`lax.top_k` on CPU costs a partial sort per row, ~linear in the row length, and at SAE widths it
is a large share of a training step. The k largest entries of a row all lie in the k blocks (of
`block` consecutive latents) with the largest maxima: a kept entry outside them would have k
larger block maxima above it, hence k larger entries. So a vectorised max over blocks, a top-k of
the M/block maxima and a top-k of the k*block gathered candidates select the same set as
`lax.top_k` (up to exact ties, which either rule may break differently). BatchTopK applies the
same argument to the whole batch, with radix selects instead of top-k calls.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SELECT_BLOCK = 16  # latents per block of the first stage


def row_top_k(
    z_BM: jax.Array, k: int, block: int = SELECT_BLOCK, bias_M: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(values [B, k], latent indices [B, k] int32) of each row's k largest of z + bias.

    The bias is added inside each stage (never to the whole [B, M] array at once: writing the
    biased pre-activations out would cost a pass as long as the top-k). The two-stage rule runs
    when it prunes at least half of a row (k * block <= M / 2); the latents past the last whole
    block (M % block of them) are always candidates.
    """
    B, M = z_BM.shape
    bias_M = jnp.zeros((M,), z_BM.dtype) if bias_M is None else bias_M
    block = min(block, M // (2 * k))
    if block < 2:
        vals_BK, idx_BK = jax.lax.top_k(z_BM + bias_M, k)
        return vals_BK, idx_BK.astype(jnp.int32)
    nb = M // block
    # a chain of elementwise maxima over strided columns: one loop fusion, bias added on the fly
    max_BN = functools.reduce(jnp.maximum, [z_BM[:, i : nb * block : block] + bias_M[i : nb * block : block]
                                            for i in range(block)])
    _, blk_BK = jax.lax.top_k(max_BN, k)  # the k blocks that hold the row's k largest
    rows_BK = blk_BK + nb * jnp.arange(B, dtype=blk_BK.dtype)[:, None]  # the blocks as rows of [B*nb, block]
    cand_BKb = z_BM[:, : nb * block].reshape(B * nb, block).at[rows_BK].get(mode="promise_in_bounds")
    cand_BC = (cand_BKb + bias_M[: nb * block].reshape(nb, block).at[blk_BK].get(mode="promise_in_bounds")).reshape(B, -1)
    if nb * block < M:  # the tail that fills no whole block
        cand_BC = jnp.concatenate([cand_BC, z_BM[:, nb * block :] + bias_M[nb * block :]], axis=1)
    vals_BK, pos_BK = jax.lax.top_k(cand_BC, k)
    blk_of_BK = jnp.take_along_axis(blk_BK, jnp.minimum(pos_BK // block, k - 1), axis=1)
    lat_BK = jnp.where(pos_BK < k * block, blk_of_BK * block + pos_BK % block, pos_BK + (nb - k) * block)
    return vals_BK, lat_BK.astype(jnp.int32)


def batch_top_k(
    z_BM: jax.Array, k: int, block: int = SELECT_BLOCK, bias_M: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(values_N, rows_N, latents_N) of the N = k*B largest of z + bias in the whole batch,
    grouped by row (int32 indices).

    The same pruning as `row_top_k`, over the batch: the N largest lie in the N blocks with the
    largest maxima. Both selections (N of the B*M/block maxima, then N of the N*block gathered
    candidates) are radix selects (`_largest_mask`), whose masks keep row-major order, so no
    sort is needed to group the entries by token.
    """
    B, M = z_BM.shape
    n = k * B
    bias_M = jnp.zeros((M,), z_BM.dtype) if bias_M is None else bias_M
    block = max(1, min(block, M // (2 * k)))
    pad = (-M) % block
    if pad:  # odd widths: -inf latents fill the last block and are never kept
        z_BM = jnp.pad(z_BM, ((0, 0), (0, pad)), constant_values=-jnp.inf)
        bias_M = jnp.pad(bias_M, (0, pad))
    nb = (M + pad) // block
    max_BN = functools.reduce(jnp.maximum, [z_BM[:, i::block] + bias_M[i::block] for i in range(block)])
    blk_N = jnp.nonzero(_largest_mask(max_BN.reshape(-1), n), size=n)[0]  # ascending: row-major
    cand_NL = z_BM.reshape(B * nb, block).at[blk_N].get(mode="promise_in_bounds")
    cand_NL = cand_NL + bias_M.reshape(nb, block).at[blk_N % nb].get(mode="promise_in_bounds")
    pos_N = jnp.nonzero(_largest_mask(cand_NL.reshape(-1), n), size=n)[0]
    blk_of_N = blk_N[pos_N // block]
    lat_N = (blk_of_N % nb) * block + pos_N % block
    return cand_NL.reshape(-1)[pos_N], (blk_of_N // nb).astype(jnp.int32), lat_N.astype(jnp.int32)


def _largest_mask(v_N: jax.Array, n: int) -> jax.Array:
    """Mask of the n largest of v_N, by radix select: the n-th largest value is found bit by bit
    on the order-preserving uint32 image of the floats, 32 vectorised counting passes (a top-k or
    a sort of a few hundred thousand values costs many times more on CPU)."""
    bits_N = jax.lax.bitcast_convert_type(v_N.astype(jnp.float32), jnp.uint32)
    u_N = jnp.where(bits_N >> 31 == 1, ~bits_N, bits_N | jnp.uint32(1 << 31))

    def bit(i, t):
        trial = t | (jnp.uint32(1 << 31) >> i.astype(jnp.uint32))
        return jnp.where(jnp.sum(u_N >= trial) >= n, trial, t)

    t = jax.lax.fori_loop(0, 32, bit, jnp.uint32(0))  # the largest t with n values >= t
    above_N, tie_N = u_N > t, u_N == t
    return above_N | (tie_N & (jnp.cumsum(tie_N) <= n - jnp.sum(above_N)))
