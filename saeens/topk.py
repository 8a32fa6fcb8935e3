"""Exact TopK and BatchTopK selection, cheap on CPU: block maxima prune the candidates first.

`lax.top_k` on CPU costs a partial sort per row, ~linear in the row length, and at SAE widths it
is a large share of a training step. The k largest entries of a row all lie in the k blocks (of
`block` consecutive latents) with the largest maxima: a kept entry outside them would have k
larger block maxima above it, hence k larger entries. So a vectorised max over blocks, a top-k of
the M/block maxima and a top-k of the k*block gathered candidates select the same set as
`lax.top_k` (up to exact ties, which either rule may break differently).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SELECT_BLOCK = 16  # latents per block of the first stage
BATCH_CANDIDATES = 4  # BatchTopK: each row offers its top (this * k) pre-activations


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


def batch_top_k(pre_BM: jax.Array, k: int, block: int = SELECT_BLOCK) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(values_N, rows_N, latents_N) of the N = k*B largest pre-activations of the batch, grouped
    by row (int32 indices).

    Each row offers its top (BATCH_CANDIDATES * k) as candidates and the batch's k*B largest are
    taken among them. That is exact unless some row had all its candidates kept (its next value
    might belong too): then the flat top-k over the whole batch runs instead (a `lax.while_loop`
    of 0 or 1 iterations, so under vmap it costs nothing unless a member needs it).
    """
    B, M = pre_BM.shape
    n = k * B
    c = min(M, BATCH_CANDIDATES * k)
    if c >= M:  # every pre-activation is a candidate: the flat top-k is the only way
        vals, flat = jax.lax.top_k(pre_BM.reshape(-1), n)
        rows, lats = flat // M, flat % M
    else:
        cv_BC, ci_BC = row_top_k(pre_BM, c, block)  # (BatchTopK's flat fallback needs pre whole)
        vals, sel = jax.lax.top_k(cv_BC.reshape(-1), n)  # positions in the [B, c] candidates
        rows, lats = sel // c, ci_BC.reshape(-1)[sel]
        need_exact = jnp.any(jnp.zeros((B,), jnp.int32).at[rows].add(1) >= c)

        def exact(state):
            v, f = jax.lax.top_k(pre_BM.reshape(-1), n)
            return v, f // M, f % M, jnp.zeros((), bool)

        vals, rows, lats, _ = jax.lax.while_loop(lambda st: st[3], exact, (vals, rows, lats, need_exact))
    order = jnp.argsort(rows, stable=True)  # group the entries by token (locality of the decode)
    return vals[order], rows[order].astype(jnp.int32), lats[order].astype(jnp.int32)
