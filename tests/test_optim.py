"""The unit-norm decoder constraint as optax transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saeens.config import TrainConfig
from saeens.optim import make_optimizer, remove_parallel_decoder_grads


def test_parallel_gradient_component_is_removed():
    W = jax.random.normal(jax.random.key(0), (6, 4))
    W = W / jnp.linalg.norm(W, axis=1, keepdims=True)
    g = jax.random.normal(jax.random.key(1), (6, 4))
    tx = remove_parallel_decoder_grads()
    out, _ = tx.update({"W_dec": g, "b": jnp.ones(3)}, tx.init(None), {"W_dec": W, "b": jnp.ones(3)})
    np.testing.assert_allclose(jnp.sum(out["W_dec"] * W, axis=1), 0, atol=1e-6)
    np.testing.assert_array_equal(out["b"], jnp.ones(3))
    # the perpendicular part is untouched
    np.testing.assert_allclose(out["W_dec"], g - jnp.sum(g * W, 1, keepdims=True) * W, atol=1e-6)


def test_rows_stay_unit_norm_under_updates():
    params = {"W_dec": jax.random.normal(jax.random.key(0), (5, 3)), "b_dec": jnp.zeros(3)}
    params["W_dec"] = params["W_dec"] / jnp.linalg.norm(params["W_dec"], axis=1, keepdims=True)
    opt = make_optimizer(TrainConfig(lr=0.1, batch_size=1, n_tokens=1))
    state = opt.init(params)
    for i in range(10):
        grads = jax.tree.map(lambda a: jax.random.normal(jax.random.key(i), a.shape), params)
        updates, state = opt.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(jnp.linalg.norm(params["W_dec"], axis=1), 1.0, atol=1e-5)
