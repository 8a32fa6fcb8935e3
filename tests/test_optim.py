"""The fused optimizer == the paper's optax chain (project, clip, Adam, renormalise), step by step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from saeens.config import TrainConfig
from saeens.optim import make_optimizer


def _on_decoder(fn):
    """An optax transform that rewrites the W_dec leaf of the updates with fn(update, W_dec)."""

    def update(updates, state, params=None):
        return updates | {"W_dec": fn(updates["W_dec"], params["W_dec"])}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _project(g_MD, W_MD):
    W_unit_MD = W_MD / jnp.linalg.norm(W_MD, axis=-1, keepdims=True)
    return g_MD - jnp.sum(g_MD * W_unit_MD, axis=-1, keepdims=True) * W_unit_MD


def _land_on_unit(u_MD, W_MD):
    new_MD = W_MD + u_MD
    return new_MD / jnp.linalg.norm(new_MD, axis=-1, keepdims=True) - W_MD


def _reference(tcfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        _on_decoder(_project),
        optax.clip_by_global_norm(tcfg.grad_clip),
        optax.adam(tcfg.lr, b1=tcfg.beta1, b2=tcfg.beta2),
        _on_decoder(_land_on_unit),
    )


def _params(seed=0, M=12, D=5):
    k = jax.random.split(jax.random.key(seed), 3)
    W_dec = jax.random.normal(k[0], (M, D))
    return {"W_enc": jax.random.normal(k[1], (D, M)), "b_enc": jnp.zeros(M),
            "W_dec": W_dec / jnp.linalg.norm(W_dec, axis=1, keepdims=True), "b_dec": jax.random.normal(k[2], (D,))}


@pytest.mark.parametrize("beta1", [0.0, 0.9])
@pytest.mark.parametrize("grad_scale", [1e-3, 10.0])  # global norm below / above the clip
def test_fused_optimizer_equals_the_optax_chain(beta1, grad_scale):
    tcfg = TrainConfig(lr=0.05, beta1=beta1, batch_size=1, n_tokens=1)
    fused, ref = make_optimizer(tcfg), _reference(tcfg)
    p_f = p_r = _params()
    s_f, s_r = fused.init(p_f), ref.init(p_r)
    step = jax.jit(lambda tx_update, g, s, p: tx_update(g, s, p), static_argnums=0)
    for i in range(8):
        grads = jax.tree.map(lambda a: grad_scale * jax.random.normal(jax.random.key(100 + i), a.shape), p_f)
        u_f, s_f = step(fused.update, grads, s_f, p_f)
        u_r, s_r = step(ref.update, grads, s_r, p_r)
        p_f, p_r = optax.apply_updates(p_f, u_f), optax.apply_updates(p_r, u_r)
        for name in p_r:
            np.testing.assert_allclose(p_f[name], p_r[name], rtol=2e-5, atol=2e-6, err_msg=f"step {i} {name}")
    np.testing.assert_allclose(jnp.linalg.norm(p_f["W_dec"], axis=1), 1.0, atol=1e-5)


def test_no_first_moment_is_stored_when_beta1_is_zero():
    params = _params()
    state = make_optimizer(TrainConfig(beta1=0.0, batch_size=1, n_tokens=1)).init(params)
    state_b1 = make_optimizer(TrainConfig(beta1=0.9, batch_size=1, n_tokens=1)).init(params)
    n_params = sum(a.size for a in jax.tree.leaves(params))
    assert sum(a.size for a in jax.tree.leaves(state)) == n_params + 1  # nu and the step count
    assert sum(a.size for a in jax.tree.leaves(state_b1)) == 2 * n_params + 1
