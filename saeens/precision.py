"""Mixed precision for training: the matmuls (and the codes) in the config's compute dtype, bf16 on
accelerators, while params, optimizer state, gradients and losses stay float32.

One product rule serves the dense loss (saeens/sae.py) and the sparse kernel (saeens/kernels.py):
operands cast to the compute dtype, accumulation and result in float32, so a sum over d or over
tokens never rounds in bf16; the cast's transpose hands float32 gradients back to the params.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def matmul(a: jax.Array, b: jax.Array, dtype: str | jnp.dtype) -> jax.Array:
    """a @ b with both operands in `dtype`, accumulated and returned in float32."""
    return jnp.matmul(a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)
