"""Sparse TopK / BatchTopK training kernel: forward + backward touch only the selected latents.

A dense TopK step costs ~12*d*m FLOPs per token (encoder, decoder and four backward products), but
only the encoder matmul (2*d*m) is unavoidable: the decoder and every backward product involve just
the k selected latents of each token. `sparse_loss` computes the same loss as `sae.loss` (topk and
batchtopk, AuxK included) with a `jax.custom_vjp` whose gradients never form a dense [B, m] product:

  pre = (x - b_dec) @ W_enc + b_enc        dense, the one unavoidable matmul
  (v, latents) = top-k of pre              saeens/topk.py (exact, block-pruned)
  per entry (token b, latent l, value v), a = relu(v), g = d loss / d x_hat[b]:
      x_hat[b] += a W_dec[l];   dW_dec[l] += a g;   dv = (g . W_dec[l]) [v > 0]
      dW_enc[:, l] += dv (x - b_dec)[b];   db_enc[l] += dv
  db_dec = sum_b g[b] - W_enc @ db_enc     (b_dec enters every pre-activation: no [B, m] product)

TopK keeps k entries per token, so a `lax.scan` over blocks of tokens does all of that in ONE pass:
each block gathers its W_dec rows once, reconstructs its tokens, and at once forms g (a token's
error depends on its own entries only) and scatters both weight gradients. The gradients are
therefore computed in the forward pass of the custom_vjp (for a unit cotangent of the loss; the
backward pass scales them) and no [B*k, d] intermediate exists beyond one block. BatchTopK's
entries vary per token: a first scan over chunks of entries reconstructs, a second scatters the
gradients.

AuxK runs on the dead latents only, in blocks (saeens/auxk.py): zero work when nothing is dead.

Ties: an AuxK selection by threshold keeps every dead latent >= the k_aux-th largest value, and the
block-pruned top-k may break exact ties differently from `lax.top_k`: both differ from the dense
rule only for exactly equal pre-activations (measure zero for real data). The kernel does not
differentiate with respect to x (training never does) nor through the returned codes: it raises.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from saeens import auxk, precision, topk
from saeens.config import SAEConfig
from saeens.errors import SaeensError

Params = dict[str, jax.Array]

CHUNK = 2048  # entries per scan step (64 tokens x k=32): keeps the gathered rows in cache
LANES = 2  # TopK: independent slices of the batch (one per CPU core this machine class has)


class Spec(NamedTuple):
    """Static description of the kernel (hashable: a nondiff argument of the custom_vjp)."""

    k: int
    k_aux: int
    batch: bool  # BatchTopK (True) or per-token TopK
    chunk: int = CHUNK
    aux_block: int = auxk.AUX_BLOCK
    select_block: int = topk.SELECT_BLOCK
    compute_dtype: str = "float32"  # the encoder product and the selection ("bfloat16" on accelerators)
    lanes: int = LANES


def spec_of(
    cfg: SAEConfig, chunk: int = CHUNK, aux_block: int = auxk.AUX_BLOCK, select_block: int = topk.SELECT_BLOCK
) -> Spec:
    if cfg.arch not in ("topk", "batchtopk"):
        raise ValueError(f"the sparse kernel covers topk and batchtopk, not {cfg.arch!r}: use kernel='dense'")
    return Spec(cfg.k, cfg.k_aux, cfg.arch == "batchtopk", chunk, aux_block, select_block, cfg.compute_dtype)


def dense_codes(a_N: jax.Array, rows_N: jax.Array, lat_N: jax.Array, B: int, M: int) -> jax.Array:
    """The [B, M] codes (no gradient): one scatter of the N kept values."""
    a_N, rows_N, lat_N = jax.lax.stop_gradient((a_N, rows_N, lat_N))
    return jnp.zeros((B, M), a_N.dtype).at[rows_N, lat_N].set(a_N, mode="promise_in_bounds")


class _Grads(NamedTuple):
    """The main (reconstruction) loss's gradients for a unit cotangent."""

    W_dec: jax.Array  # [M, D]
    W_enc_T: jax.Array  # [M, D]
    dv_N: jax.Array  # d loss / d kept pre-activation


# --------------------------------------------------------------------------- TopK: one pass over token blocks


def _blocks(n: int, size: int, *arrays: jax.Array) -> list[jax.Array]:
    """Pad arrays along axis 0 with zeros to a multiple of size; reshape to [n_blocks, size, ...]."""
    pad = (-n) % size
    return [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(-1, size, *a.shape[1:]) for a in arrays]


def _rows_pass(v_BK, lat_BK, xc_BD, W_dec_MD, chunk: int, grads: bool, n_tokens: int):
    """TopK: the error xc - sum_k a W_dec[latent] [B, D] and (grads) the main loss's _Grads, for
    these B of the batch's n_tokens tokens.

    Padding tokens carry v = 0, so they add nothing to the gradients; their errors are sliced off.
    """
    B, K = v_BK.shape
    M, D = W_dec_MD.shape
    T = max(1, min(B, chunk // K))
    v_NTK, l_NTK, xc_NTD = _blocks(B, T, v_BK, lat_BK, xc_BD)

    def body(acc, t):
        v_TK, l_TK, xc_TD = t
        a_TK = jax.nn.relu(v_TK)
        W_TKD = W_dec_MD.at[l_TK].get(mode="promise_in_bounds")
        err_TD = xc_TD - jnp.einsum("tk,tkd->td", a_TK, W_TKD)
        if not grads:
            return acc, (err_TD, None)
        g_TD = (-2.0 / n_tokens) * err_TD
        dv_TK = jnp.where(v_TK > 0, jnp.einsum("td,tkd->tk", g_TD, W_TKD), 0)
        l_E = l_TK.reshape(-1)
        dWd_MD = acc[0].at[l_E].add((a_TK[:, :, None] * g_TD[:, None]).reshape(-1, D), mode="promise_in_bounds")
        dWeT_MD = acc[1].at[l_E].add((dv_TK[:, :, None] * xc_TD[:, None]).reshape(-1, D), mode="promise_in_bounds")
        return (dWd_MD, dWeT_MD), (err_TD, dv_TK)

    acc0 = (jnp.zeros((M, D), W_dec_MD.dtype),) * 2 if grads else ()
    acc, (err_NTD, dv_NTK) = jax.lax.scan(body, acc0, (v_NTK, l_NTK, xc_NTD))
    err_BD = err_NTD.reshape(-1, D)[:B]
    if not grads:
        return err_BD, None
    return err_BD, _Grads(acc[0], acc[1], dv_NTK.reshape(-1)[: B * K])


def _encoder_product(xc_BD, W_enc, compute_dtype: str):
    """(x - b_dec) @ W_enc in the compute dtype (bf16 halves the [B, m] array the selection reads;
    the kept values are cast back to fp32)."""
    return precision.matmul(xc_BD, W_enc, compute_dtype).astype(compute_dtype)


def _rows_lanes(spec: Spec, xc_BD, W_enc, b_enc, W_dec, grads: bool):
    """The encoder product, TopK selection and `_rows_pass` on `spec.lanes` independent slices of
    the batch.

    XLA:CPU runs independent ops at once, and the top-k calls and the gather/scatter loops are
    single-threaded: in slices they keep every core busy (one product per slice: slicing one
    [B, m] product would copy it). The slices' gradients are summed.
    """
    B = xc_BD.shape[0]
    lanes = max(1, min(spec.lanes, B))
    bounds = [B * i // lanes for i in range(lanes + 1)]
    v, lat, err, parts = [], [], [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        z_BM = _encoder_product(xc_BD[lo:hi], W_enc, spec.compute_dtype)
        v_BK, lat_BK = topk.row_top_k(z_BM, spec.k, spec.select_block, b_enc)
        v_BK = v_BK.astype(W_dec.dtype)
        err_BD, main = _rows_pass(v_BK, lat_BK, xc_BD[lo:hi], W_dec, spec.chunk, grads, B)
        v, lat, err, parts = v + [v_BK.reshape(-1)], lat + [lat_BK.reshape(-1)], err + [err_BD], parts + [main]
    main = None if not grads else _Grads(
        sum(g.W_dec for g in parts), sum(g.W_enc_T for g in parts), jnp.concatenate([g.dv_N for g in parts]))
    return jnp.concatenate(v), jnp.concatenate(lat), jnp.concatenate(err), main


# --------------------------------------------------------------------------- BatchTopK: entry chunks


def _entries_pass(v_N, rows_N, lat_N, xc_BD, W_dec_MD, chunk: int, grads: bool):
    """BatchTopK (entries grouped by token): the error [B, D] and (grads) the main loss's _Grads."""
    B, D = xc_BD.shape
    M = W_dec_MD.shape[0]
    n = v_N.shape[0]
    E = min(chunk, n)
    v_CE, r_CE, l_CE = _blocks(n, E, v_N, rows_N, lat_N)  # padding entries: v = 0 adds nothing

    def decode(acc_BD, t):
        v_E, r_E, l_E = t
        rows_ED = W_dec_MD.at[l_E].get(mode="promise_in_bounds") * jax.nn.relu(v_E)[:, None]
        return acc_BD.at[r_E].add(rows_ED, mode="promise_in_bounds"), None

    x_hat_BD, _ = jax.lax.scan(decode, jnp.zeros((B, D), W_dec_MD.dtype), (v_CE, r_CE, l_CE))
    err_BD = xc_BD - x_hat_BD
    if not grads:
        return err_BD, None
    g_BD = (-2.0 / B) * err_BD

    def backward(acc, t):
        v_E, r_E, l_E = t
        g_ED = g_BD.at[r_E].get(mode="promise_in_bounds")
        W_ED = W_dec_MD.at[l_E].get(mode="promise_in_bounds")
        dv_E = jnp.where(v_E > 0, jnp.sum(g_ED * W_ED, axis=-1), 0)
        xc_ED = xc_BD.at[r_E].get(mode="promise_in_bounds")
        dWd_MD = acc[0].at[l_E].add(jax.nn.relu(v_E)[:, None] * g_ED, mode="promise_in_bounds")
        dWeT_MD = acc[1].at[l_E].add(dv_E[:, None] * xc_ED, mode="promise_in_bounds")
        return (dWd_MD, dWeT_MD), dv_E

    zeros = jnp.zeros((M, D), W_dec_MD.dtype)
    (dWd, dWeT), dv_CE = jax.lax.scan(backward, (zeros, zeros), (v_CE, r_CE, l_CE))
    return err_BD, _Grads(dWd, dWeT, dv_CE.reshape(-1)[:n])


# --------------------------------------------------------------------------- the custom_vjp


def _forward(spec: Spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M, grads: bool):
    B = x_BD.shape[0]
    M = W_dec.shape[0]
    xc_BD = x_BD - b_dec
    if spec.batch:
        z_BM = _encoder_product(xc_BD, W_enc, spec.compute_dtype)
        v_N, rows_N, lat_N = topk.batch_top_k(z_BM, spec.k, spec.select_block, b_enc.astype(z_BM.dtype))
        v_N = v_N.astype(W_dec.dtype)
        err_BD, main = _entries_pass(v_N, rows_N, lat_N, xc_BD, W_dec, spec.chunk, grads)
    else:
        v_N, lat_N, err_BD, main = _rows_lanes(spec, xc_BD, W_enc, b_enc, W_dec, grads)
        rows_N = jnp.repeat(jnp.arange(B, dtype=jnp.int32), spec.k)
    mse = jnp.sum(err_BD**2) / B
    blk = min(spec.aux_block, M)
    dead = auxk.dead_blocks(dead_M, blk)
    thr_B = auxk.threshold(xc_BD, W_enc, b_enc, dead, spec.k_aux, blk)
    err_hat_BD = auxk.forward(xc_BD, W_enc, b_enc, W_dec, dead, thr_B, blk)
    total_var = jnp.float32(B)  # AuxK on the main loss's scale: mean over tokens (sae.auxk_loss)
    diff_BD = err_hat_BD - err_BD  # the target err is a constant (stop_gradient in sae.auxk_loss)
    auxk_loss = jnp.where(dead.n > 0, jnp.sum(diff_BD**2) / total_var, 0.0)
    out = (mse, auxk_loss, jax.nn.relu(v_N), rows_N, lat_N)
    if not grads:
        return out, None
    dbe_M = jnp.zeros((M,), W_dec.dtype).at[lat_N].add(main.dv_N, mode="promise_in_bounds")
    sum_g_D = (-2.0 / B) * jnp.sum(err_BD, axis=0)
    res = (W_enc, b_enc, W_dec, xc_BD, diff_BD, total_var, dead, thr_B, main.W_dec, main.W_enc_T, dbe_M, sum_g_D)
    return out, res


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(spec: Spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M):
    """(mse, raw AuxK loss, relu'd kept values a_N, rows_N, latents_N)."""
    return _forward(spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M, grads=False)[0]


def _core_fwd(spec, W_enc, b_enc, W_dec, b_dec, x_BD, dead_M):
    if x_BD.perturbed:
        raise SaeensError("the sparse SAE kernel does not differentiate w.r.t. the input x: use kernel='dense'")
    return _forward(spec, W_enc.value, b_enc.value, W_dec.value, b_dec.value, x_BD.value, dead_M.value, grads=True)


def _zero_or(g, like):
    return jnp.zeros_like(like) if isinstance(g, SymbolicZero) else g


def _core_bwd(spec, res, cts):
    W_enc, b_enc, W_dec, xc_BD, diff_BD, total_var, dead, thr_B, dWd, dWeT, dbe, sum_g_D = res
    g_mse, g_aux, g_a = cts[0], cts[1], cts[2]
    if not isinstance(g_a, SymbolicZero):
        raise SaeensError("the sparse SAE kernel's codes carry no gradient: use kernel='dense' to differentiate them")
    g_mse = _zero_or(g_mse, total_var)
    g_aux = _zero_or(g_aux, total_var)
    acc = (g_mse * dWd, g_mse * dWeT, g_mse * dbe)
    g_eh_BD = jnp.where(dead.n > 0, 2.0 * g_aux / total_var, 0.0) * diff_BD
    blk = min(spec.aux_block, W_dec.shape[0])
    dWd, dWeT, dbe = auxk.backward(xc_BD, W_enc, b_enc, W_dec, dead, thr_B, g_eh_BD, blk, acc)
    db_dec = g_mse * sum_g_D - W_enc @ dbe  # d pre / d b_dec = -W_enc^T, summed over tokens
    return dWeT.T, dbe, dWd, db_dec, None, None


_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


# --------------------------------------------------------------------------- public API


def topk_residual(params: Params, cfg: SAEConfig, x_BD: jax.Array) -> jax.Array:
    """x minus a TopK SAE's reconstruction, forward only: the encoder product, the block-pruned
    top-k and a gather decode (B*k*d FLOPs, not a dense decoder's B*m*d). Boosting's residual
    passes run it once per row and stage."""
    xc_BD = x_BD - params["b_dec"]
    return _rows_lanes(spec_of(cfg), xc_BD, params["W_enc"], params["b_enc"], params["W_dec"], grads=False)[2]


def sparse_loss(
    params: Params, cfg: SAEConfig, x_BD: jax.Array, dead_M: jax.Array, spec: Spec | None = None
) -> tuple[jax.Array, dict[str, Any]]:
    """`sae.loss` for topk/batchtopk through the sparse kernel: same value, same gradients.

    aux: mse, sparsity_loss (aux_coeff * AuxK), codes ([B, M], a stop-gradient scatter of the kept
    values: XLA drops it when unused), and the cheap summaries a train step needs: fired [M]
    (latent fired in this batch), l0 (mean kept codes > 0 per token), min_kept (smallest positive
    kept code; inf if none), plus the sparse codes themselves (code_vals, code_rows, code_latents).
    """
    spec = spec_of(cfg) if spec is None else spec
    B, M = x_BD.shape[0], params["W_dec"].shape[0]
    mse, auxk_loss, a_N, rows_N, lat_N = _core(
        spec, params["W_enc"], params["b_enc"], params["W_dec"], params["b_dec"], x_BD, dead_M
    )
    sparsity = cfg.aux_coeff * auxk_loss
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
