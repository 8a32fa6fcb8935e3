"""Sparse TopK / BatchTopK training kernel: forward + backward touch only the selected latents.

A dense TopK step costs ~12*d*m FLOPs per token (encoder, decoder and four backward products), but
only the encoder matmul (2*d*m) is unavoidable: the decoder and every backward product involve just
the k selected latents of each token. `sparse_loss` computes the same loss as `sae.loss` (topk and
batchtopk, AuxK included) with a `jax.custom_vjp` whose backward pass never forms a dense [B, m]
gradient matmul:

  forward   pre = (x - b_dec) @ W_enc + b_enc        dense, the one unavoidable matmul
            (vals, latents) = top-k of pre           N = B*k entries (row, latent, value)
            x_hat = sum_entries relu(v) W_dec[latent] + b_dec      gather, chunked
  backward  dW_dec[latent] += relu(v) g_xhat[row]                  scatter-add, chunked
            dv = (g_xhat[row] . W_dec[latent]) * (v > 0)
            dW_enc[:, latent] += dv (x - b_dec)[row];  db_enc[latent] += dv
            db_dec = sum_b g_xhat[b] - W_enc @ db_enc              (no [B, m] product)

The entries are processed in chunks of `chunk` entries inside a `lax.scan`, so no [B*k, d]
intermediate is ever materialised (on CPU, allocating those costs more than the arithmetic).

AuxK (Gao et al.): the top-k_aux DEAD latents of each token reconstruct the residual. Dead latents
are compacted to the front (`dead_idx`) and processed in blocks of `aux_block` columns inside a
`lax.while_loop` whose trip count is ceil(n_dead / aux_block): zero work when nothing is dead, and
small dense [B, aux_block] products otherwise. When more than k_aux latents are dead, the per-token
k_aux-th largest dead pre-activation (the selection threshold) is found by a blockwise running
top-k merge. Under `jax.vmap` (bagging) the loops run max-over-members iterations.

BatchTopK keeps the k*B largest pre-activations of the whole batch. A flat top-(k*B) over B*m
values is slow on CPU, so the kernel takes each row's top-(4k) candidates, selects the batch top-k*B
among them, and falls back to the exact flat top-k when some row had all its candidates kept
(a `lax.while_loop` of 0 or 1 iterations, so under vmap it costs nothing unless a member needs it).

Ties: an AuxK selection by threshold keeps every dead latent >= the k_aux-th largest value; it
differs from `lax.top_k` only for exactly equal positive pre-activations (measure zero for real
data). The kernel does not differentiate with respect to x (training never does): it raises if asked.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from saeens.config import SAEConfig
from saeens.errors import SaeensError

Params = dict[str, jax.Array]

CHUNK = 2048  # entries per scan step (64 tokens x k=32): keeps the gathered rows in cache
AUX_BLOCK = 256  # dead latents per AuxK block
BATCH_CANDIDATES = 4  # BatchTopK: each row offers its top (this * k) pre-activations


class Spec(NamedTuple):
    """Static description of the kernel (hashable: a nondiff argument of the custom_vjp)."""

    k: int
    k_aux: int
    batch: bool  # BatchTopK (True) or per-token TopK
    chunk: int = CHUNK
    aux_block: int = AUX_BLOCK


def spec_of(cfg: SAEConfig, chunk: int = CHUNK, aux_block: int = AUX_BLOCK) -> Spec:
    if cfg.arch not in ("topk", "batchtopk"):
        raise ValueError(f"the sparse kernel covers topk and batchtopk, not {cfg.arch!r}: use kernel='dense'")
    return Spec(cfg.k, cfg.k_aux, cfg.arch == "batchtopk", chunk, aux_block)


# --------------------------------------------------------------------------- selection


def select(pre_BM: jax.Array, k: int, batch: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(values_N, rows_N, latents_N) of the N = B*k kept pre-activations (not yet ReLU'd).

    TopK: each row's k largest, row-major. BatchTopK: the k*B largest of the batch, grouped by row.
    """
    B, M = pre_BM.shape
    if not batch:
        vals_BK, idx_BK = jax.lax.top_k(pre_BM, k)
        rows_BK = jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, k))
        return vals_BK.reshape(-1), rows_BK.reshape(-1), idx_BK.reshape(-1).astype(jnp.int32)
    n = k * B
    c = min(M, BATCH_CANDIDATES * k)
    if c >= M:  # every pre-activation is a candidate: the flat top-k is the only way
        vals, flat = jax.lax.top_k(pre_BM.reshape(-1), n)
        rows, lats = flat // M, flat % M
    else:
        cv_BC, ci_BC = jax.lax.top_k(pre_BM, c)
        vals, sel = jax.lax.top_k(cv_BC.reshape(-1), n)  # positions in the [B, c] candidates
        rows, lats = sel // c, ci_BC.reshape(-1)[sel]
        # exact unless some row had all c candidates kept (its (c+1)-th value might belong too)
        need_exact = jnp.any(jnp.zeros((B,), jnp.int32).at[rows].add(1) >= c)

        def exact(state):
            v, f = jax.lax.top_k(pre_BM.reshape(-1), n)
            return v, f // M, f % M, jnp.zeros((), bool)

        vals, rows, lats, _ = jax.lax.while_loop(lambda st: st[3], exact, (vals, rows, lats, need_exact))
    order = jnp.argsort(rows, stable=True)  # group the entries by token (locality of the decode)
    return vals[order], rows[order].astype(jnp.int32), lats[order].astype(jnp.int32)


def dense_codes(a_N: jax.Array, rows_N: jax.Array, lat_N: jax.Array, B: int, M: int) -> jax.Array:
    """The [B, M] codes (no gradient): one scatter of the N kept values."""
    a_N, rows_N, lat_N = jax.lax.stop_gradient((a_N, rows_N, lat_N))
    return jnp.zeros((B, M), a_N.dtype).at[rows_N, lat_N].set(a_N, mode="promise_in_bounds")


# --------------------------------------------------------------------------- chunked entry loops


def _chunked(n: int, chunk: int, *arrays: jax.Array) -> tuple[int, list[jax.Array]]:
    """Pad [N] arrays with zeros to a multiple of the chunk and reshape to [n_chunks, chunk]."""
    e = min(chunk, n)
    pad = (-n) % e
    out = [jnp.pad(a, (0, pad)).reshape(-1, e) for a in arrays]
    return e, out


def _decode(a_N, rows_N, lat_N, W_dec_MD, B, chunk):
    """sum over entries of a * W_dec[latent] into rows: [B, D] (without b_dec)."""
    D = W_dec_MD.shape[1]
    _, (a_CE, r_CE, l_CE) = _chunked(a_N.shape[0], chunk, a_N, rows_N, lat_N)

    def body(acc_BD, t):
        a_E, r_E, l_E = t
        rows_ED = W_dec_MD.at[l_E].get(mode="promise_in_bounds") * a_E[:, None]
        return acc_BD.at[r_E].add(rows_ED, mode="promise_in_bounds"), None

    out, _ = jax.lax.scan(body, jnp.zeros((B, D), W_dec_MD.dtype), (a_CE, r_CE, l_CE))
    return out


def _entries_backward(v_N, rows_N, lat_N, g_xhat_BD, g_a_N, xc_BD, W_dec_MD, chunk):
    """Gradients of the kept entries: (dW_dec [M, D], dW_enc^T [M, D], dv_N)."""
    M, D = W_dec_MD.shape
    n = v_N.shape[0]
    _, (v_CE, r_CE, l_CE, ga_CE) = _chunked(n, chunk, v_N, rows_N, lat_N, g_a_N)

    def body(acc, t):
        dWd_MD, dWeT_MD = acc
        v_E, r_E, l_E, ga_E = t
        on_E = v_E > 0
        a_E = jnp.where(on_E, v_E, 0)
        g_ED = g_xhat_BD.at[r_E].get(mode="promise_in_bounds")
        W_ED = W_dec_MD.at[l_E].get(mode="promise_in_bounds")
        dv_E = jnp.where(on_E, jnp.sum(g_ED * W_ED, axis=-1) + ga_E, 0)
        xc_ED = xc_BD.at[r_E].get(mode="promise_in_bounds")
        dWd_MD = dWd_MD.at[l_E].add(a_E[:, None] * g_ED, mode="promise_in_bounds")
        dWeT_MD = dWeT_MD.at[l_E].add(dv_E[:, None] * xc_ED, mode="promise_in_bounds")
        return (dWd_MD, dWeT_MD), dv_E

    zeros = jnp.zeros((M, D), W_dec_MD.dtype)
    (dWd, dWeT), dv_CE = jax.lax.scan(body, (zeros, zeros), (v_CE, r_CE, l_CE, ga_CE))
    return dWd, dWeT, dv_CE.reshape(-1)[:n]


# --------------------------------------------------------------------------- AuxK on dead blocks


class _Dead(NamedTuple):
    idx: jax.Array  # [M_pad] dead latents first (ascending), then padding
    n: jax.Array  # number of dead latents
    n_blocks: jax.Array  # ceil(n / block)


def _dead_blocks(dead_M: jax.Array, block: int) -> _Dead:
    M = dead_M.shape[0]
    blk = min(block, M)
    m_pad = -(-M // blk) * blk
    idx = jnp.nonzero(dead_M, size=m_pad, fill_value=0)[0].astype(jnp.int32)
    n = jnp.sum(dead_M.astype(jnp.int32))
    return _Dead(idx, n, (n + blk - 1) // blk)


def _block(dead: _Dead, j, blk: int):
    lat_C = jax.lax.dynamic_slice_in_dim(dead.idx, j * blk, blk)
    valid_C = j * blk + jnp.arange(blk) < dead.n
    return lat_C, valid_C


def _block_pre(xc_BD, W_enc_DM, b_enc_M, lat_C, valid_C):
    W_DC = W_enc_DM.at[:, lat_C].get(mode="promise_in_bounds")
    pre_BC = xc_BD @ W_DC + b_enc_M[lat_C]
    return jnp.where(valid_C, pre_BC, -jnp.inf)


def _aux_threshold(xc_BD, W_enc_DM, b_enc_M, dead: _Dead, k_aux: int, blk: int):
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


def _aux_forward(xc_BD, W_enc_DM, b_enc_M, W_dec_MD, dead: _Dead, thr_B, blk):
    """err_hat = sum over the selected dead latents of code * W_dec row: [B, D]."""

    def body(state):
        j, acc_BD = state
        lat_C, valid_C = _block(dead, j, blk)
        codes_BC = _aux_codes(_block_pre(xc_BD, W_enc_DM, b_enc_M, lat_C, valid_C), thr_B)
        return j + 1, acc_BD + codes_BC @ W_dec_MD.at[lat_C].get(mode="promise_in_bounds")

    _, out = jax.lax.while_loop(lambda s: s[0] < dead.n_blocks, body, (jnp.int32(0), jnp.zeros_like(xc_BD)))
    return out


def _aux_backward(xc_BD, W_enc_DM, b_enc_M, W_dec_MD, dead: _Dead, thr_B, g_eh_BD, blk, acc):
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


# --------------------------------------------------------------------------- the custom_vjp


def _forward(spec: Spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M):
    B = x_BD.shape[0]
    M = W_dec.shape[0]
    xc_BD = x_BD - b_dec
    pre_BM = xc_BD @ W_enc + b_enc
    v_N, rows_N, lat_N = select(pre_BM, spec.k, spec.batch)
    a_N = jax.nn.relu(v_N)
    x_hat_BD = _decode(a_N, rows_N, lat_N, W_dec, B, spec.chunk) + b_dec
    err_BD = x_BD - x_hat_BD
    mse = jnp.mean(jnp.sum(err_BD**2, axis=-1))
    blk = min(spec.aux_block, M)
    dead = _dead_blocks(dead_M, blk)
    thr_B = _aux_threshold(xc_BD, W_enc, b_enc, dead, spec.k_aux, blk)
    err_hat_BD = _aux_forward(xc_BD, W_enc, b_enc, W_dec, dead, thr_B, blk)
    total_var = jnp.float32(x_BD.shape[0])  # AuxK on the main loss's scale: mean over tokens (sae.auxk_loss)
    diff_BD = err_hat_BD - err_BD  # the target err is a constant (stop_gradient in sae.auxk_loss)
    auxk = jnp.where(dead.n > 0, jnp.sum(diff_BD**2) / total_var, 0.0)
    out = (mse, auxk, a_N, rows_N, lat_N)
    res = (W_enc, b_enc, W_dec, xc_BD, err_BD, diff_BD, total_var, dead, thr_B, v_N, rows_N, lat_N)
    return out, res


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(spec: Spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M):
    """(mse, raw AuxK loss, relu'd kept values a_N, rows_N, latents_N)."""
    return _forward(spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M)[0]


def _core_fwd(spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M):
    if x_BD.perturbed:
        raise SaeensError("the sparse SAE kernel does not differentiate w.r.t. the input x: use kernel='dense'")
    return _forward(spec, W_enc.value, b_enc.value, W_dec.value, b_dec.value, x_BD.value, dead_M.value)


def _zero_or(g, like):
    return jnp.zeros_like(like) if isinstance(g, SymbolicZero) else g


def _core_bwd(spec, res, cts):
    W_enc, b_enc, W_dec, xc_BD, err_BD, diff_BD, total_var, dead, thr_B, v_N, rows_N, lat_N = res
    g_mse, g_aux, g_a = cts[0], cts[1], cts[2]
    B = xc_BD.shape[0]
    M = W_dec.shape[0]
    g_mse = _zero_or(g_mse, total_var)
    g_aux = _zero_or(g_aux, total_var)
    g_a_N = _zero_or(g_a, v_N)
    g_xhat_BD = (-2.0 / B) * g_mse * err_BD
    dWd, dWeT, dv_N = _entries_backward(v_N, rows_N, lat_N, g_xhat_BD, g_a_N, xc_BD, W_dec, spec.chunk)
    dbe = jnp.zeros((M,), W_dec.dtype).at[lat_N].add(dv_N, mode="promise_in_bounds")
    g_eh_BD = jnp.where(dead.n > 0, 2.0 * g_aux / total_var, 0.0) * diff_BD
    blk = min(spec.aux_block, M)
    dWd, dWeT, dbe = _aux_backward(xc_BD, W_enc, b_enc, W_dec, dead, thr_B, g_eh_BD, blk, (dWd, dWeT, dbe))
    db_dec = jnp.sum(g_xhat_BD, axis=0) - W_enc @ dbe  # d pre / d b_dec = -W_enc^T, summed over tokens
    return dWeT.T, dbe, dWd, db_dec, None, None


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------- public API


def sparse_loss(
    params: Params, cfg: SAEConfig, x_BD: jax.Array, dead_M: jax.Array, spec: Spec | None = None
) -> tuple[jax.Array, dict[str, Any]]:
    """`sae.loss` for topk/batchtopk through the sparse kernel: same value, same gradients.

    aux: mse, sparsity_loss (aux_coeff * AuxK), codes ([B, M], a stop-gradient scatter of the kept
    values: XLA drops it when unused), and the cheap summaries train.update needs: fired [M]
    (latent fired in this batch), l0 (mean kept codes > 0 per token), min_kept (smallest positive
    kept code; inf if none), plus the sparse codes themselves (code_vals, code_rows, code_latents).
    """
    spec = spec_of(cfg) if spec is None else spec
    B, M = x_BD.shape[0], params["W_dec"].shape[0]
    mse, auxk, a_N, rows_N, lat_N = _core(
        spec, params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], x_BD, dead_M
    )
    sparsity = cfg.aux_coeff * auxk
    a_ng = jax.lax.stop_gradient(a_N)
    on_N = a_ng > 0
    aux = {
        "mse": mse,
        "sparsity_loss": sparsity,
        "codes": dense_codes(a_ng, rows_N, lat_N, B, M),
        "fired": jnp.zeros((M,), bool).at[lat_N].max(on_N, mode="promise_in_bounds"),
        "l0": jnp.sum(on_N) / B,
        "min_kept": jnp.min(jnp.where(on_N, a_ng, jnp.inf)),
        "code_vals": a_ng,
        "code_rows": rows_N,
        "code_latents": lat_N,
    }
    return mse + sparsity, aux
