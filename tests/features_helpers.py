"""Shared data for the feature tests: a small cache with its context layout and ensembles with planted matches."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from saeens import ensemble, sae
from saeens.config import SAEConfig
from saeens.data.corpora import Document
from saeens.data.build import cache_documents
from saeens.data.extract import model_acts_fn
from saeens.data.tokens import byte_tokenizer

HOOK = "blocks.1.hook_resid_post"
WORDS = "the cat sat on a mat while dogs ran past news of markets and rain fell".split()


def documents(n: int = 24, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [Document(" ".join(rng.choice(WORDS, size=rng.integers(10, 40))), ["a", "b"][i % 2], f"doc{i}") for i in range(n)]


def make_cache(out: Path, model) -> Path:
    """~1.3k rows of the tiny model on short documents, contexts of 16 tokens, shards of 100 rows."""
    return cache_documents(model_acts_fn(model, HOOK), byte_tokenizer(), documents(), None, out, context_length=16,
                           batch_size=8, test_fraction=0.25, seed=0, meta={"model": None, "hook": HOOK},
                           shard_rows=100, progress=False)


def make_ensemble(arch: str, method: str = "bagging", J: int = 3, width: int = 12, d_in: int = 8, seed: int = 0,
                  shared: int = 4) -> ensemble.Ensemble:
    """Random members whose first `shared` features are near-copies of member 0's (planted consensus);
    biases shifted so a good share of codes fire."""
    cfg = SAEConfig(d_in=d_in, width=width, arch=arch, k=3)
    keys = jax.random.split(jax.random.key(seed), J + 1)
    params = jax.vmap(lambda k: sae.init(k, cfg))(keys[:J])
    rng = np.random.default_rng(seed)
    W_dec = np.array(params["W_dec"])
    for j in range(1, J):
        W_dec[j, :shared] = W_dec[0, :shared] + 0.05 * rng.standard_normal((shared, d_in))
    W_dec /= np.linalg.norm(W_dec, axis=-1, keepdims=True)
    params = {**params, "W_dec": jnp.asarray(W_dec), "W_enc": jnp.asarray(W_dec.transpose(0, 2, 1) * 2.0),
              "b_enc": jnp.asarray(rng.normal(0.0, 0.3, (J, width)), jnp.float32),
              "b_dec": jnp.asarray(rng.normal(0.0, 0.1, (J, d_in)), jnp.float32)}
    if arch == "jumprelu":
        params["log_threshold"] = jnp.full((J, width), np.log(0.2), jnp.float32)
    if arch == "batchtopk":
        params["threshold"] = jnp.asarray(rng.uniform(0.0, 0.3, (J, width)), jnp.float32)
    return (ensemble.boosting if method == "boosting" else ensemble.bagging)(cfg, params)
