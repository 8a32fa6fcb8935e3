"""All test tokens in one pass: a running accumulator (init_stats / update_stats / finalize) and
`evaluate_stream`, equal to the per-batch metrics (metrics/batch.py) on the concatenated data.

explained_variance_per_token is the exception: it is centred per chunk, as SAELens centres per
eval batch (see `batch.explained_variance_per_token`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from saeens.metrics.batch import DENSE_THRESHOLD, ev_from_sse_sst, firing, pooled_ev_from_sse_sst

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
    ev = ev_from_sse_sst(s["sse_D"], stats.m2_D)
    F = stats.fire_F.shape[0]
    if stats.cofire_FF is None:
        conn = jnp.float32(jnp.nan)
    else:
        conn = 1.0 - jnp.sum(stats.cofire_FF, dtype=jnp.float32) / (F * F)
    return {
        "mse": jnp.sum(s["sse_D"]) / n,
        "explained_variance": ev,
        "explained_variance_pooled": pooled_ev_from_sse_sst(s["sse_D"], stats.m2_D),
        "explained_variance_per_token": s["ev_tok"] / n,
        "fvu": 1.0 - ev,
        "l0": s["l0"] / n,
        "relative_reconstruction_bias": s["xhat_sq"] / s["x_dot_xhat"],
        "dead_fraction": jnp.mean(stats.fire_F == 0),
        "dense_fraction": jnp.mean(stats.fire_F.astype(jnp.float32) / n > dense_threshold),
        "connectivity": conn,
    }


def finalize(stats: Stats, dense_threshold: float = DENSE_THRESHOLD, members: int = 1) -> dict[str, float]:
    """The metrics over every token seen: mse, explained_variance (paper's, per-dimension),
    explained_variance_pooled (1 - sum SSE / sum SST: variance-weighted), explained_variance_per_token
    (SAELens', chunk-centred), fvu, l0, relative_reconstruction_bias, dead_fraction, dense_fraction,
    connectivity (NaN without co-firing), n_tokens, and ev_drivers (the dimensions that pull the
    per-dimension EV down, with their variance shares).

    members > 1: the features are that many equal blocks in member order (an ensemble's concatenated
    codes), and l0_per_member / dead_fraction_per_member split l0 and dead_fraction by block, which
    shows, e.g., boosting stages that a shared sparsity penalty has silenced."""
    result = {k: float(v) for k, v in _finalize_arrays(stats, dense_threshold).items()}
    result["n_tokens"] = int(stats.n_tokens)
    result["ev_drivers"] = ev_drivers(np.asarray(stats.sums["sse_D"]), np.asarray(stats.m2_D))
    if members > 1:
        fire_JM = np.asarray(stats.fire_F).reshape(members, -1)  # raises unless the features split evenly
        result["l0_per_member"] = (fire_JM.sum(1, dtype=np.float64) / result["n_tokens"]).tolist()
        result["dead_fraction_per_member"] = (fire_JM == 0).mean(1).tolist()
    return result


def ev_drivers(sse_D: np.ndarray, sst_D: np.ndarray, n: int = 5) -> list[dict[str, float]]:
    """The n dimensions that pull the per-dimension explained variance down most: each one's EV,
    its share of the total variance and its share of the shortfall sum_d SSE_d/SST_d. A negative
    mean EV driven by a few low-variance dimensions shows here as large shortfall shares at tiny
    variance shares (compare explained_variance_pooled, 1 - sum SSE / sum SST)."""
    varies = np.flatnonzero(sst_D > 0)
    ratio = np.asarray(sse_D, np.float64)[varies] / np.asarray(sst_D, np.float64)[varies]
    worst = np.argsort(-ratio, kind="stable")[:n]
    total_sst, total_ratio = float(np.sum(sst_D, dtype=np.float64)), float(ratio.sum())
    return [{"dim": int(varies[i]), "explained_variance": float(1.0 - ratio[i]),
             "variance_share": float(sst_D[varies[i]]) / total_sst,
             "shortfall_share": float(ratio[i]) / total_ratio if total_ratio > 0 else 0.0} for i in worst]


update_stats_jit = jax.jit(update_stats, donate_argnums=0)
"""update_stats compiled, the old stats donated (updated in place): what evaluate_stream calls."""


def evaluate_stream(
    forward_fn: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    chunks: Iterable[np.ndarray],
    n_features: int,
    *,
    cofire: bool = True,
    progress: bool = False,
    n_tokens: int | None = None,
    dense_threshold: float = DENSE_THRESHOLD,
    members: int = 1,
) -> dict[str, float]:
    """Every per-token metric over a chunked stream of activations, in one pass.

    forward_fn(x_BD) -> (x_hat_BD, codes_BF), e.g. functools.partial(saeens.ensemble.forward, ens);
    it is jitted here (a partial's arrays become jit arguments, not baked-in constants). chunks:
    an iterable of [n, d] arrays (a last, shorter chunk costs one more compile). n_tokens: the
    rows the chunks hold, for the progress bar only (it counts tokens, as a user thinks of a split).
    members: the ensemble's member count, for finalize's per-member l0 and dead fraction.
    Returns `finalize`'s dict.
    """
    from tqdm.auto import tqdm

    fwd = jax.jit(forward_fn)
    stats: Stats | None = None
    with tqdm(total=n_tokens, desc="evaluate", unit="tok", unit_scale=True, disable=not progress) as bar:
        for x in chunks:
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
            bar.update(x_BD.shape[0])
    if stats is None or int(stats.n_tokens) == 0:
        raise ValueError("evaluate_stream got no activations: the chunk iterable was empty")
    return finalize(stats, dense_threshold, members)
