"""Sweeps: J members that differ in learning rate and sparsity coefficients, trained by ONE step.

The hyperparameters are data, not static config: each member's lr, l1_coeff, l0_coeff and
jumprelu_bandwidth sit in the stacked state beside its params, and one member step (mapped over
the members exactly as bagging's, `bagging.over_members`) builds that member's optimizer from its
traced lr and hands its coefficients to the loss. So one compiled program trains the whole grid.

Every member starts from the key of a single run with the same seed, and all see the same batches:
member j IS the single run with member j's settings (a sweep compares settings, not seeds).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from saeens import sae
from saeens.config import SWEPT, SAEConfig, TrainConfig
from saeens.optim import sae_adam
from saeens.train.bagging import over_members
from saeens.train.step import TrainState, advance, init_state


class SweepState(NamedTuple):
    """A TrainState stacked over the J members (same fields, leading axis J) plus their settings."""

    params: sae.Params
    opt_state: optax.OptState
    since_fired: jax.Array
    scale: jax.Array
    step: jax.Array
    hparams: dict[str, jax.Array]  # [J] each: lr, l1_coeff, l0_coeff, jumprelu_bandwidth


def member_optimizer(lr: jax.Array | float, tcfg: TrainConfig) -> optax.GradientTransformation:
    """The single run's optimizer (saeens.optim.make_optimizer) with lr as a (traced) value."""
    return sae_adam(lr, tcfg.beta1, tcfg.beta2, tcfg.grad_clip)


def init_sweep(
    key: jax.Array, cfg: SAEConfig, tcfg: TrainConfig, sample_ND: jax.Array, settings: list[dict[str, float]]
) -> SweepState:
    """J copies of the single run's initial state (same key), each with its settings."""
    one = init_state(key, cfg, tcfg, sample_ND, member_optimizer(tcfg.lr, tcfg))
    J = len(settings)
    stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (J, *jnp.shape(a))), one)
    hparams = {name: jnp.asarray([s[name] for s in settings], jnp.float32) for name in SWEPT}
    return SweepState(*stacked, hparams)


def make_sweep_step(cfg: SAEConfig, tcfg: TrainConfig, member_batch: int | None = None) -> Callable:
    """(stacked state, batch, key) -> (stacked state, per-member metrics [J]), one compiled step."""

    def member_step(state: SweepState, x_BD: jax.Array, key: jax.Array) -> tuple[SweepState, dict[str, jax.Array]]:
        del key  # the contract's key; the losses are deterministic
        hp = state.hparams
        coeffs = {name: hp[name] for name in sae.COEFFICIENTS}
        sub, metrics = advance(TrainState(*state[:5]), x_BD * state.scale, cfg, member_optimizer(hp["lr"], tcfg), coeffs)
        return SweepState(*sub, hp), metrics

    return over_members(member_step, cfg, member_batch)

