"""The optimizer: Adam with the unit-norm decoder constraint as optax GradientTransformations.

Keeping decoder rows at unit norm takes two transforms in one optax.chain, not a special case in
the training loop: before Adam, remove each W_dec row's gradient component parallel to the row
(the direction that only changes its norm); after Adam, turn the update into the one that lands
on the renormalised row.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from saeens.config import TrainConfig


def _map_decoder(fn, tree, *rest):
    """Apply fn to the W_dec leaf of a params-shaped dict, leave the other leaves untouched."""
    out = dict(tree)
    out["W_dec"] = fn(tree["W_dec"], *(r["W_dec"] for r in rest))
    return out


def remove_parallel_decoder_grads() -> optax.GradientTransformation:
    def update(updates, state, params=None):
        def project(g_MD, W_MD):
            W_unit_MD = W_MD / jnp.linalg.norm(W_MD, axis=-1, keepdims=True)
            return g_MD - jnp.sum(g_MD * W_unit_MD, axis=-1, keepdims=True) * W_unit_MD

        return _map_decoder(project, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def renormalize_decoder() -> optax.GradientTransformation:
    def update(updates, state, params=None):
        def land_on_unit(u_MD, W_MD):
            new_MD = W_MD + u_MD
            return new_MD / jnp.linalg.norm(new_MD, axis=-1, keepdims=True) - W_MD

        return _map_decoder(land_on_unit, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Paper defaults: project, clip the global grad norm, Adam (constant lr), renormalise."""
    return optax.chain(
        remove_parallel_decoder_grads(),
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adam(cfg.lr, b1=cfg.beta1, b2=cfg.beta2),
        renormalize_decoder(),
    )

