"""Naive bagging: J SAEs that differ only in their initial key, trained by ONE compiled step.

The member train states are stacked on a leading axis (params, Adam moments, dead-latent
counters); `jax.vmap` of the single-SAE step over that axis, with the batch broadcast, updates
every member on the same batch in one jitted call. Member j is exactly the SAE that a single run
with key split(key, J)[j] would train.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from saeens import ensemble, sae
from saeens.config import SAEConfig, TrainConfig
from saeens.ensemble import Ensemble
from saeens.train.step import TrainState, init_state, make_step


def member_keys(key: jax.Array, members: int) -> jax.Array:
    return jax.random.split(key, members)


def init_members(
    key: jax.Array, cfg: SAEConfig, tcfg: TrainConfig, sample_ND: jax.Array, members: int,
    opt: optax.GradientTransformation,
) -> TrainState:
    """Stacked member states: vmap of the single-SAE init over J split keys."""
    return jax.vmap(lambda k: init_state(k, cfg, tcfg, sample_ND, opt))(member_keys(key, members))


def sequential_members(cfg: SAEConfig) -> bool:
    """On one CPU device, a loop over members inside the compiled step beats vmap for the sparse
    kernel (XLA:CPU batches its scatters slowly: measured 0.66-0.70x of J separate steps with vmap,
    0.96-1.0x with the loop, benchmarks/); elsewhere vmap wins or the members are sharded."""
    return sae.uses_sparse_kernel(cfg) and jax.default_backend() == "cpu" and jax.device_count() == 1


def over_members(member_step: Callable, cfg: SAEConfig, member_batch: int | None = None) -> Callable:
    """A one-member step `(state, batch, key) -> (state, metrics)` as ONE step over stacked members
    (each gets the batch and its split key): what bagging and sweeps share.

    member_batch None: all members in one jax.vmap (or a loop, see `sequential_members`); an int
    n: lax.map over chunks of n members, each chunk vmapped (n = 1 is a plain loop)."""
    if member_batch is None and sequential_members(cfg):
        member_batch = 1

    def members_step(state: Any, x_BD: jax.Array, key: jax.Array) -> tuple[Any, dict[str, jax.Array]]:
        keys = member_keys(key, state.step.shape[0])
        if member_batch is None:
            return jax.vmap(member_step, in_axes=(0, None, 0))(state, x_BD, keys)
        # batch_size=1 would still vmap (over chunks of one): a plain map keeps the unbatched kernel
        chunk = None if member_batch == 1 else member_batch
        return jax.lax.map(lambda sk: member_step(sk[0], x_BD, sk[1]), (state, keys), batch_size=chunk)

    return members_step


def make_bagging_step(cfg: SAEConfig, opt: optax.GradientTransformation, member_batch: int | None = None) -> Callable:
    """(stacked state, batch, key) -> (stacked state, per-member metrics [J]), one compiled step."""
    return over_members(make_step(cfg, opt), cfg, member_batch)


def final_ensemble(cfg: SAEConfig, state: TrainState) -> Ensemble:
    """The members in activation units (each folds the shared input scale), weights 1/J."""
    return ensemble.bagging(cfg, jax.vmap(lambda p, s: sae.fold_scale(p, cfg, s))(state.params, state.scale))
