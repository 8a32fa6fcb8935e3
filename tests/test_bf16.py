"""compute_dtype="bfloat16": the training matmuls and codes in bf16, params, Adam state and losses
in float32, and the training curve close to float32's (dense loss and sparse kernel)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import sae, train
from saeens.config import SAEConfig, TrainConfig
from saeens.data.cache import batch_indices
from saeens.optim import make_optimizer
from saeens.synthetic import make_synthetic

STEPS, BATCH = 40, 256


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(8000, 32, 96, active=4, seed=0)


def _train(syn, arch, kernel, dtype):
    cfg = SAEConfig(32, 128, arch, k=4, kernel=kernel, compute_dtype=dtype, l1_coeff=1.0, dead_tokens=BATCH)
    tcfg = TrainConfig(n_tokens=STEPS * BATCH, batch_size=BATCH, lr=3e-3)
    opt = make_optimizer(tcfg)
    state = train.init_state(jax.random.key(0), cfg, tcfg, jnp.asarray(syn.acts_ND[:1024]), opt)
    step = jax.jit(train.make_step(cfg, opt))
    mse = []
    for s in range(STEPS):
        state, metrics = step(state, syn.acts_ND[batch_indices(8000, BATCH, 0, s)], jax.random.key(s))
        mse.append(float(metrics["mse"]))
    return cfg, state, np.asarray(mse)


@pytest.mark.parametrize("arch,kernel", [("topk", "sparse"), ("batchtopk", "sparse"), ("relu", "dense"), ("jumprelu", "dense")])
def test_bf16_training_stays_close_to_float32_and_keeps_float32_state(syn, arch, kernel):
    """bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%), so pre-activations carry
    ~0.4% error and TopK selections flip on near-ties: measured per-step MSE within 0.9% of float32
    (TopK/BatchTopK; 0.13% ReLU/JumpReLU) over 60 steps. Bounds: 3% per step, 1.5% over the last
    10 steps, decoder rows at cosine >= 0.98 on average; and the two runs must differ (bf16 ran)."""
    _, s32, mse32 = _train(syn, arch, kernel, "float32")
    cfg, s16, mse16 = _train(syn, arch, kernel, "bfloat16")
    rel = np.abs(mse16 - mse32) / mse32
    assert rel.max() < 0.03 and rel[-10:].mean() < 0.015, rel
    assert rel.max() > 0, "bf16 gave float32's numbers: the compute dtype was not applied"
    cos_M = np.sum(np.asarray(s16.params["W_dec"]) * np.asarray(s32.params["W_dec"]), axis=-1)  # unit rows
    assert cos_M.mean() >= 0.98, cos_M.mean()
    for leaf in jax.tree.leaves((s16.params, s16.opt_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert leaf.dtype == jnp.float32, leaf.dtype
    x_BD = jnp.asarray(syn.acts_ND[:BATCH])
    loss, aux = sae.loss(s16.params, cfg, x_BD, jnp.zeros((cfg.width,), bool))
    assert loss.dtype == jnp.float32 and aux["mse"].dtype == jnp.float32
    if kernel == "dense":
        assert aux["codes"].dtype == jnp.bfloat16  # the [B, M] codes in bf16
    grads = jax.grad(lambda p: sae.loss(p, cfg, x_BD, jnp.zeros((cfg.width,), bool))[0])(s16.params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
