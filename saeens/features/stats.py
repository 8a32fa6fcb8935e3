"""Per-feature statistics of an ensemble in ONE streaming pass over a cache split.

For every feature (column of `saeens.ensemble.encode`): tokens it fires on, the sum and max of its
activations, its top-N activating rows (a running buffer of N per feature, merged chunk by chunk:
memory F x N whatever the number of tokens) and a histogram of its non-zero activations. The
histogram has FIXED bins on a log10 range, 1e-3 .. 1e5 with `BINS_PER_DECADE` bins a decade
(values outside land in the end bins), so no first pass is needed and runs are comparable.
The same pass folds the full and the consensus ensemble's reconstructions into saeens.metrics'
streaming accumulators, so their intrinsic metrics need no further pass.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saeens import ensemble, metrics
from saeens.ensemble import Ensemble

LOG10_LO, LOG10_HI, BINS_PER_DECADE = -3.0, 5.0, 10
N_BINS = int((LOG10_HI - LOG10_LO) * BINS_PER_DECADE)


def hist_edges() -> np.ndarray:
    """The N_BINS + 1 bin edges of every feature's histogram (activation values)."""
    return 10.0 ** np.linspace(LOG10_LO, LOG10_HI, N_BINS + 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Running per-feature sums (a pytree). top_val_FN is sorted descending; -inf marks an empty slot
    and top_row_FN holds row indices into the split (earlier rows first among equal values)."""

    n_tokens: jax.Array  # int32 []
    fire_F: jax.Array  # int32
    sum_F: jax.Array  # float32, Kahan-compensated by comp_F
    comp_F: jax.Array
    max_F: jax.Array
    top_val_FN: jax.Array
    top_row_FN: jax.Array  # int32
    hist_FK: jax.Array  # int32 [F, N_BINS]


def init_feature_stats(n_features: int, top_n: int) -> FeatureStats:
    F = n_features
    return FeatureStats(
        n_tokens=jnp.zeros((), jnp.int32), fire_F=jnp.zeros((F,), jnp.int32), sum_F=jnp.zeros((F,), jnp.float32),
        comp_F=jnp.zeros((F,), jnp.float32), max_F=jnp.zeros((F,), jnp.float32),
        top_val_FN=jnp.full((F, top_n), -jnp.inf, jnp.float32), top_row_FN=jnp.full((F, top_n), -1, jnp.int32),
        hist_FK=jnp.zeros((F, N_BINS), jnp.int32),
    )


def chunk_top(cand_BF: jax.Array, n: int, group: int = 16) -> tuple[jax.Array, jax.Array]:
    """Each column's min(n, B) largest values and their rows [F, k], descending, the lower row first
    among equal values; lax.top_k over [F, B] costs more than the encoder on CPU, so only the n
    groups of `group` rows with the largest maxima are ranked: they hold the n largest values (a
    group holding one of them has a maximum at least that large, and at most n - 1 groups beat it)."""
    B, F = cand_BF.shape
    n_groups = -(-B // group)
    cand_GgF = jnp.pad(cand_BF, ((0, n_groups * group - B), (0, 0)), constant_values=-jnp.inf).reshape(n_groups, group, F)
    _, best_Fk = jax.lax.top_k(cand_GgF.max(1).T, min(n, n_groups))
    best_kF = jnp.sort(best_Fk, axis=-1).T  # groups in row order, so ties keep the lower row first
    vals_FC = jnp.take_along_axis(cand_GgF, best_kF[:, None, :], axis=0).reshape(-1, F).T
    rows_FC = (best_kF[:, None, :] * group + jnp.arange(group)[None, :, None]).reshape(-1, F).T
    val_Fk, take_Fk = jax.lax.top_k(vals_FC, min(n, B))
    return val_Fk, jnp.take_along_axis(rows_FC, take_Fk, axis=1)


def update_feature_stats(s: FeatureStats, codes_BF: jax.Array, row0: jax.Array) -> FeatureStats:
    """Fold the codes of rows row0 .. row0 + B - 1 into the running statistics (pure)."""
    B, F = codes_BF.shape
    N = s.top_val_FN.shape[1]
    on_BF = codes_BF > 0
    val_Fk, pos_Fk = chunk_top(jnp.where(on_BF, codes_BF, -jnp.inf), N)
    # the buffer first: among equal values its (earlier) rows win, as in a stable sort of all rows
    val_FM = jnp.concatenate([s.top_val_FN, val_Fk], axis=1)
    row_FM = jnp.concatenate([s.top_row_FN, (row0 + pos_Fk).astype(jnp.int32)], axis=1)
    top_val_FN, take_FN = jax.lax.top_k(val_FM, N)
    top_row_FN = jnp.take_along_axis(row_FM, take_FN, axis=1)

    chunk_sum_F = jnp.sum(jnp.where(on_BF, codes_BF, 0.0), axis=0)
    y_F = chunk_sum_F - s.comp_F
    t_F = s.sum_F + y_F
    log_BF = jnp.log10(jnp.where(on_BF, codes_BF, 1.0))
    bin_BF = jnp.clip(jnp.floor((log_BF - LOG10_LO) * BINS_PER_DECADE), 0, N_BINS - 1).astype(jnp.int32)
    flat = (jnp.arange(F, dtype=jnp.int32)[None, :] * N_BINS + bin_BF).reshape(-1)
    hist = s.hist_FK.reshape(-1).at[flat].add(on_BF.reshape(-1).astype(jnp.int32))
    return FeatureStats(
        n_tokens=s.n_tokens + B, fire_F=s.fire_F + jnp.sum(on_BF, axis=0, dtype=jnp.int32), sum_F=t_F,
        comp_F=(t_F - s.sum_F) - y_F, max_F=jnp.maximum(s.max_F, jnp.max(codes_BF, axis=0)),
        top_val_FN=top_val_FN, top_row_FN=top_row_FN, hist_FK=hist.reshape(F, N_BINS),
    )


def summarize(s: FeatureStats) -> dict[str, np.ndarray]:
    """NumPy arrays: frequency [F] (fraction of tokens it fires on), mean_act [F] (mean over the
    tokens it fires on; 0 for a dead feature), max_act [F], top_value / top_row [F, N] (empty
    slots: value 0, row -1), hist [F, N_BINS], n_tokens."""
    fire_F = np.asarray(s.fire_F)
    top_val_FN = np.asarray(s.top_val_FN)
    empty_FN = ~np.isfinite(top_val_FN)
    return {
        "n_tokens": int(s.n_tokens),
        "frequency": fire_F / max(int(s.n_tokens), 1),
        "mean_act": np.asarray(s.sum_F) / np.maximum(fire_F, 1),
        "max_act": np.asarray(s.max_F),
        "top_value": np.where(empty_FN, 0.0, top_val_FN),
        "top_row": np.where(empty_FN, -1, np.asarray(s.top_row_FN)),
        "hist": np.asarray(s.hist_FK),
    }


def even_chunks(chunks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The same rows in chunks of exactly `rows` (the last may be shorter), across shard boundaries
    and skipped rows: one compiled shape for the whole pass instead of one per odd chunk."""
    buf: list[np.ndarray] = []
    have = 0
    for x in chunks:
        while len(x):
            take = min(rows - have, len(x))
            buf.append(x[:take])
            have += take
            x = x[take:]
            if have == rows:
                yield np.concatenate(buf)
                buf, have = [], 0
    if have:
        yield np.concatenate(buf)


@partial(jax.jit, donate_argnums=(0, 1, 2))
def _step(fs: FeatureStats, full: metrics.Stats, cons: metrics.Stats, ens: Ensemble, keep_K: jax.Array,
          x_BD: jax.Array, row0: jax.Array) -> tuple[FeatureStats, metrics.Stats, metrics.Stats]:
    codes_BF = ensemble.encode(ens, x_BD)
    dec_FD, bias_D = ensemble.decoder(ens), ensemble.decoder_bias(ens)
    kept_BK = codes_BF[:, keep_K]
    full = metrics.update_stats(full, x_BD, codes_BF @ dec_FD + bias_D, codes_BF)
    cons = metrics.update_stats(cons, x_BD, kept_BK @ dec_FD[keep_K] + bias_D, kept_BK)
    return update_feature_stats(fs, codes_BF, row0), full, cons


def feature_pass(ens: Ensemble, chunks: Iterable[np.ndarray], keep_F: np.ndarray, top_n: int = 20,
                 total_rows: int | None = None, progress: bool = True) -> dict[str, Any]:
    """The one pass: per-feature statistics (`summarize`) plus "metrics_full" and "metrics_consensus"
    (saeens.metrics.finalize of the full ensemble and of the consensus one that keeps the features
    where keep_F is True; co-firing is skipped, so connectivity is NaN: `saeens evaluate` has it),
    "seconds" and "tokens_per_second" of the pass."""
    from tqdm.auto import tqdm

    keep_K = jnp.asarray(np.flatnonzero(keep_F), jnp.int32)
    fs = init_feature_stats(ens.width, top_n)
    full = metrics.init_stats(ens.cfg.d_in, ens.width, cofire=False)
    cons = metrics.init_stats(ens.cfg.d_in, int(keep_K.shape[0]), cofire=False)
    bar = tqdm(total=total_rows, unit="tok", desc="features", disable=not progress, leave=False)
    t0, row0 = time.perf_counter(), 0
    for x in chunks:
        if len(x) == 0:
            continue
        fs, full, cons = _step(fs, full, cons, ens, keep_K, jnp.asarray(x, jnp.float32), jnp.int32(row0))
        row0 += len(x)
        bar.update(len(x))
    jax.block_until_ready(fs)
    bar.close()
    seconds = time.perf_counter() - t0
    return {**summarize(fs), "metrics_full": metrics.finalize(full), "metrics_consensus": metrics.finalize(cons),
            "seconds": seconds, "tokens_per_second": row0 / max(seconds, 1e-9)}
