"""One SAE's train state and its pure step: the update every method (bagging, boosting) builds on."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from saeens import sae
from saeens.config import SAEConfig, TrainConfig
from saeens.sae import Params


class TrainState(NamedTuple):
    params: Params
    opt_state: optax.OptState
    since_fired: jax.Array  # [M] tokens since each latent last fired (capped at cfg.dead_tokens)
    scale: jax.Array  # input normalisation factor (1.0 when off); folded into params on export
    step: jax.Array  # int32 scalar


def norm_scale(sample_ND: jax.Array) -> jax.Array:
    """Factor that gives the inputs a mean norm of sqrt(d_in) (SAELens' normalisation)."""
    return jnp.sqrt(sample_ND.shape[-1]) / jnp.mean(jnp.linalg.norm(sample_ND, axis=-1))


def input_scale(sample_ND: jax.Array, tcfg: TrainConfig) -> jax.Array:
    return norm_scale(sample_ND) if tcfg.normalize_activations else jnp.float32(1.0)


def init_state(
    key: jax.Array, cfg: SAEConfig, tcfg: TrainConfig, sample_ND: jax.Array, opt: optax.GradientTransformation
) -> TrainState:
    """b_dec starts at the geometric median of the (scaled) sample."""
    scale = input_scale(sample_ND, tcfg)
    params = sae.init(key, cfg, sae.geometric_median(sample_ND * scale))
    return TrainState(params, opt.init(params), jnp.zeros((cfg.width,), jnp.int32), scale, jnp.int32(0))


def update(
    params: Params,
    opt_state: optax.OptState,
    since_fired_M: jax.Array,
    x_BD: jax.Array,
    cfg: SAEConfig,
    opt: optax.GradientTransformation,
    coeffs: sae.Coefficients | None = None,
) -> tuple[Params, optax.OptState, jax.Array, dict[str, jax.Array]]:
    """One optimisation step of one SAE on an already-scaled batch (coeffs: see sae.loss)."""
    dead_M = since_fired_M >= cfg.dead_tokens
    (loss, aux), grads = jax.value_and_grad(sae.loss, has_aux=True)(params, cfg, x_BD, dead_M, coeffs)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = sae.update_inference_threshold(optax.apply_updates(params, updates), cfg, aux["min_kept"])
    # sae.loss's summaries (fired, l0): the sparse kernel then never builds [B, M] codes
    since_fired_M = jnp.where(aux["fired"], 0, jnp.minimum(since_fired_M + x_BD.shape[0], cfg.dead_tokens))
    metrics = {
        "loss": loss,
        "mse": aux["mse"],
        "sparsity_loss": aux["sparsity_loss"],
        "l0": aux["l0"],
        "dead_fraction": jnp.mean(since_fired_M >= cfg.dead_tokens),
    }
    return params, opt_state, since_fired_M, metrics


def advance(
    state: TrainState, x_BD: jax.Array, cfg: SAEConfig, opt: optax.GradientTransformation,
    coeffs: sae.Coefficients | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The state after one step on x_BD, which is ALREADY in the state's scaled units (boosting
    passes a stage's residual here)."""
    params, opt_state, since, metrics = update(
        state.params, state.opt_state, state.since_fired, x_BD, cfg, opt, coeffs
    )
    return TrainState(params, opt_state, since, state.scale, state.step + 1), metrics


def make_step(cfg: SAEConfig, opt: optax.GradientTransformation) -> Callable:
    """The pure step `(state, raw batch, key) -> (state, metrics)` of one SAE.

    The key is part of the contract every method shares; the SAE losses here are deterministic.
    """

    def single_step(state: TrainState, x_BD: jax.Array, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        del key
        return advance(state, x_BD * state.scale, cfg, opt)

    return single_step
