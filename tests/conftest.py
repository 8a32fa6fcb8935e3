"""Test setup: 8 simulated CPU devices (set before jax is imported) for the sharding tests."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model():
    """A 2-layer random Llama-family model (d=8, vocab 257), weights from numpy: nnx's own init
    compiles one program per weight shape, slow on CPU."""
    import jax
    import numpy as np
    from flax import nnx

    from saeens import models

    cfg = models.ModelConfig(family="llama", vocab_size=257, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1,
                             d_head=4, d_mlp=16, max_positions=64, name="tiny")
    abstract = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), nnx.to_pure_dict(nnx.split(abstract)[1]))
    return models.build_model(cfg, params)


@pytest.fixture(scope="session")
def tiny_bagging():
    """A random 2-member ReLU bagging ensemble on d=8 (the tiny model's width)."""
    import jax

    from saeens import ensemble, sae
    from saeens.config import SAEConfig

    cfg = SAEConfig(d_in=8, width=12, arch="relu")
    return ensemble.bagging(cfg, jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(jax.random.key(1), 2)))
