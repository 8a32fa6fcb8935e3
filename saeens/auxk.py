"""AuxK (Gao et al.) for the sparse kernel: the top-k_aux DEAD latents of each token reconstruct
the residual, touching only the dead latents.

Dead latents are compacted to the front (`Dead.idx`) and processed in blocks of `aux_block` columns inside a
`lax.while_loop` whose trip count is ceil(n_dead / aux_block): zero work when nothing is dead, and
small dense [B, aux_block] products otherwise. When more than k_aux latents are dead, the per-token
k_aux-th largest dead pre-activation (the selection threshold) is found by a blockwise running
top-k merge. Under `jax.vmap` (bagging) the loops run max-over-members iterations.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

AUX_BLOCK = 256  # dead latents per AuxK block


class Dead(NamedTuple):
    idx: jax.Array  # [M_pad] dead latents first (ascending), then padding
    n: jax.Array  # number of dead latents
    n_blocks: jax.Array  # ceil(n / block)


def dead_blocks(dead_M: jax.Array, block: int) -> Dead:
    M = dead_M.shape[0]
    blk = min(block, M)
    m_pad = -(-M // blk) * blk
    idx = jnp.nonzero(dead_M, size=m_pad, fill_value=0)[0].astype(jnp.int32)
    n = jnp.sum(dead_M.astype(jnp.int32))
    return Dead(idx, n, (n + blk - 1) // blk)


def _block(dead: Dead, j, blk: int):
    lat_C = jax.lax.dynamic_slice_in_dim(dead.idx, j * blk, blk)
    valid_C = j * blk + jnp.arange(blk) < dead.n
    return lat_C, valid_C


def _block_pre(xc_BD, W_enc_DM, b_enc_M, lat_C, valid_C):
    W_DC = W_enc_DM.at[:, lat_C].get(mode="promise_in_bounds")
    pre_BC = xc_BD @ W_DC + b_enc_M[lat_C]
    return jnp.where(valid_C, pre_BC, -jnp.inf)


def threshold(xc_BD, W_enc_DM, b_enc_M, dead: Dead, k_aux: int, blk: int):
    """Per token, the k_aux-th largest dead pre-activation (-inf when at most k_aux are dead)."""
    B = xc_BD.shape[0]
    kk = min(k_aux, dead.idx.shape[0])
    run0 = jnp.full((B, kk), -jnp.inf, xc_BD.dtype)
    trips = jnp.where(dead.n > k_aux, dead.n_blocks, 0)

    def body(state):
        j, run_BK = state
        lat_C, valid_C = _block(dead, j, blk)
        cand = jnp.concatenate([run_BK, _block_pre(xc_BD, W_enc_DM, b_enc_M, lat_C, valid_C)], axis=1)
        return j + 1, jax.lax.top_k(cand, kk)[0]

    _, run_BK = jax.lax.while_loop(lambda s: s[0] < trips, body, (jnp.int32(0), run0))
    return run_BK[:, -1]


def _aux_codes(pre_BC, thr_B):
    sel_BC = pre_BC >= thr_B[:, None]
    return jnp.where(sel_BC & (pre_BC > 0), pre_BC, 0)


def forward(xc_BD, W_enc_DM, b_enc_M, W_dec_MD, dead: Dead, thr_B, blk):
    """err_hat = sum over the selected dead latents of code * W_dec row: [B, D]."""

    def body(state):
        j, acc_BD = state
        lat_C, valid_C = _block(dead, j, blk)
        codes_BC = _aux_codes(_block_pre(xc_BD, W_enc_DM, b_enc_M, lat_C, valid_C), thr_B)
        return j + 1, acc_BD + codes_BC @ W_dec_MD.at[lat_C].get(mode="promise_in_bounds")

    _, out = jax.lax.while_loop(lambda s: s[0] < dead.n_blocks, body, (jnp.int32(0), jnp.zeros_like(xc_BD)))
    return out


def backward(xc_BD, W_enc_DM, b_enc_M, W_dec_MD, dead: Dead, thr_B, g_eh_BD, blk, acc):
    """Adds AuxK's gradients into (dW_dec [M, D], dW_enc^T [M, D], db_enc [M])."""

    def body(state):
        j, (dWd, dWeT, dbe) = state
        lat_C, valid_C = _block(dead, j, blk)
        pre_BC = _block_pre(xc_BD, W_enc_DM, b_enc_M, lat_C, valid_C)
        codes_BC = _aux_codes(pre_BC, thr_B)
        W_CD = W_dec_MD.at[lat_C].get(mode="promise_in_bounds")
        dpre_BC = jnp.where(codes_BC > 0, g_eh_BD @ W_CD.T, 0)
        dWd = dWd.at[lat_C].add(codes_BC.T @ g_eh_BD, mode="promise_in_bounds")
        dWeT = dWeT.at[lat_C].add(dpre_BC.T @ xc_BD, mode="promise_in_bounds")
        dbe = dbe.at[lat_C].add(dpre_BC.sum(0), mode="promise_in_bounds")
        return j + 1, (dWd, dWeT, dbe)

    _, acc = jax.lax.while_loop(lambda s: s[0] < dead.n_blocks, body, (jnp.int32(0), acc))
    return acc
