"""A feature's direct effect on the next-token logits: its decoder row through the model's final
norm and unembedding (`Transformer.unembed`: the tied embedding for SmolLM2), i.e. what adding
the feature to the last residual stream would do to the logits, ignoring the layers after the
hook. The tokens it promotes most and suppresses most are what a dashboard shows.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saeens.errors import SaeensError


def logit_effects(model: Any, W_dec_FD: jax.Array, k: int = 10, batch: int = 256) -> dict[str, np.ndarray]:
    """For each row: promoted_ids / promoted [F, k] (largest logits, descending) and suppressed_ids /
    suppressed [F, k] (smallest, ascending), in batches of rows so memory is batch x vocab."""
    W_dec_FD = jnp.asarray(W_dec_FD, jnp.float32)
    if W_dec_FD.shape[1] != model.cfg.d_model:
        raise SaeensError(f"the features have d_in={W_dec_FD.shape[1]}, the model d_model={model.cfg.d_model}: pass the model the cache was made with")
    parts: dict[str, list[np.ndarray]] = {"promoted_ids": [], "promoted": [], "suppressed_ids": [], "suppressed": []}
    for lo in range(0, W_dec_FD.shape[0], batch):
        logits_bV = model.unembed(W_dec_FD[lo : lo + batch][None])[0]
        up, up_ids = jax.lax.top_k(logits_bV, k)
        down, down_ids = jax.lax.top_k(-logits_bV, k)
        for name, arr in (("promoted", up), ("promoted_ids", up_ids), ("suppressed", -down), ("suppressed_ids", down_ids)):
            parts[name].append(np.asarray(arr))
    if not parts["promoted"]:  # no rows selected: empty [0, k] tables
        return {name: np.zeros((0, k), np.int32 if name.endswith("_ids") else np.float32) for name in parts}
    return {name: np.concatenate(p) for name, p in parts.items()}
