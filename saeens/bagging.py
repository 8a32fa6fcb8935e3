"""Naive bagging: J SAEs that differ only in their initial key, trained by ONE compiled step.

The member train states are stacked on a leading axis (params, Adam moments, dead-latent
counters); `jax.vmap` of the single-SAE step over that axis, with the batch broadcast, updates
every member on the same batch in one jitted call. Member j is exactly the SAE that a single run
with key split(key, J)[j] would train.
"""

from __future__ import annotations

import jax

from saeens import ensemble, sae
from saeens.config import SAEConfig, TrainConfig
from saeens.optim import make_optimizer
from saeens.train import Method, TrainState, init_state, make_step


def member_keys(key: jax.Array, members: int) -> jax.Array:
    return jax.random.split(key, members)


def init_members(
    key: jax.Array, cfg: SAEConfig, tcfg: TrainConfig, sample_ND: jax.Array, members: int, opt
) -> TrainState:
    """Stacked member states: vmap of the single-SAE init over J split keys."""
    return jax.vmap(lambda k: init_state(k, cfg, tcfg, sample_ND, opt))(member_keys(key, members))


def make_bagging_step(cfg: SAEConfig, opt):
    """(stacked state, batch, key) -> (stacked state, per-member metrics [J])."""
    step = jax.vmap(make_step(cfg, opt), in_axes=(0, None, 0))

    def bagging_step(state: TrainState, x_BD: jax.Array, key: jax.Array):
        return step(state, x_BD, member_keys(key, state.step.shape[0]))

    return bagging_step


def bagging_method(cfg: SAEConfig, tcfg: TrainConfig, members: int) -> Method:
    opt = make_optimizer(tcfg)
    return Method(
        init=lambda key, sample: init_members(key, cfg, tcfg, sample, members, opt),
        step=jax.jit(make_bagging_step(cfg, opt), donate_argnums=0),
        n_steps=tcfg.n_steps,
        to_ensemble=lambda s: ensemble.bagging(cfg, jax.vmap(lambda p, c: sae.fold_scale(p, cfg, c))(s.params, s.scale)),
    )
