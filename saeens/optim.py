"""The optimizer: Adam with the unit-norm decoder constraint, as ONE optax GradientTransformation.

The paper's recipe is a chain (remove each W_dec row's gradient component parallel to the row,
clip the global gradient norm, Adam, then land every updated decoder row back on the unit
sphere). Run as four optax transforms it reads and writes the [m, d] arrays pass after pass; here
the same arithmetic is one transform that XLA fuses into a few passes. With beta1 = 0 (the paper's
default) Adam's first moment equals the clipped gradient, so it is not stored at all.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from saeens.config import TrainConfig


class SAEAdamState(NamedTuple):
    count: jax.Array  # int32 steps taken
    mu: optax.Updates | None  # first moment; None when beta1 = 0 (it would equal the gradient)
    nu: optax.Updates  # second moment


def _row_dot(a_MD: jax.Array, b_MD: jax.Array) -> jax.Array:
    return jnp.sum(a_MD * b_MD, axis=-1, keepdims=True)


def sae_adam(
    lr: float, b1: float, b2: float, grad_clip: float, eps: float = 1e-8
) -> optax.GradientTransformation:
    """project W_dec grads -> clip by global norm -> Adam (constant lr) -> renormalise W_dec rows.

    Equal, to float rounding, to optax.chain(<remove the W_dec gradient parallel to each row>,
    clip_by_global_norm(grad_clip), adam(lr, b1, b2, eps), <update that lands on unit rows>).
    """

    def init(params: optax.Params) -> SAEAdamState:
        zeros = jax.tree.map(jnp.zeros_like, params)
        return SAEAdamState(jnp.zeros([], jnp.int32), zeros if b1 > 0 else None, zeros)

    def update(grads: optax.Updates, state: SAEAdamState, params: optax.Params | None = None):
        W_MD = params["W_dec"]
        g = dict(grads)
        g["W_dec"] = g["W_dec"] - _row_dot(g["W_dec"], W_MD) / _row_dot(W_MD, W_MD) * W_MD
        g_norm = optax.tree.norm(g)
        g = jax.tree.map(lambda t: jnp.where(g_norm < grad_clip, t, t / g_norm * grad_clip), g)
        count = optax.safe_int32_increment(state.count)
        nu = jax.tree.map(lambda n, t: b2 * n + (1 - b2) * t * t, state.nu, g)
        if b1 > 0:
            mu = jax.tree.map(lambda m, t: b1 * m + (1 - b1) * t, state.mu, g)
            first = jax.tree.map(lambda m: m / (1 - b1**count), mu)
        else:
            mu, first = None, g
        c2 = 1 - b2**count
        u = jax.tree.map(lambda m, n: -lr * m / (jnp.sqrt(n / c2) + eps), first, nu)
        new_MD = W_MD + u["W_dec"]
        u["W_dec"] = new_MD * jax.lax.rsqrt(_row_dot(new_MD, new_MD)) - W_MD
        return u, SAEAdamState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """The paper's defaults: project, clip the global grad norm, Adam (constant lr), renormalise."""
    return sae_adam(cfg.lr, cfg.beta1, cfg.beta2, cfg.grad_clip)
