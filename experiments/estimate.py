"""The planned wall time of each part of the study, from throughput measured on this machine.

`measure` times a few compiled training steps at the scale's real shapes (random rows: the step's
cost does not depend on the values), once for TopK (the sparse kernel, J members) and once for the
dense architectures, as dense-model FLOP/s (the FLOP model of experiments/common.py). Each part's
training FLOPs divided by the matching rate is its planned training time; evaluations, the cache
and compilation come on top (the cache: ~1 h per 2M tokens of SmolLM2-135M on 2 CPU cores).

    python -m experiments.run_all --scale full --estimate
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from experiments import common


def measure(scale: common.Scale, d_in: int = 576, steps: int = 3) -> dict[str, float]:
    """Dense-model FLOP/s of a bagging step at the scale's shapes: "topk" (k, the scale's kernel)
    and "dense" (ReLU), after one warm-up step (compilation) each."""
    import jax
    import jax.numpy as jnp

    from saeens.train.methods import build_method

    rates = {}
    for kind, arch in (("topk", "topk"), ("dense", "relu")):
        run = common.run_config(scale, d_in, arch, "bagging", scale.members, 0)
        method = build_method(run)
        x_BD = jnp.asarray(np.random.default_rng(0).standard_normal((scale.batch_size, d_in)), jnp.float32)
        state = method.init(jax.random.key(0), x_BD)
        state, _ = method.step(state, x_BD, jax.random.key(1))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for s in range(steps):
            state, _ = method.step(state, x_BD, jax.random.key(2 + s))
        jax.block_until_ready(state)
        per_step = (time.perf_counter() - t0) / steps
        rates[kind] = 12.0 * scale.batch_size * d_in * scale.width * scale.members / per_step
    return rates


def plan(parts_tflop: dict[str, dict[str, float]], rates: dict[str, float]) -> dict[str, Any]:
    """Hours of training per part: its TopK and dense TFLOP over the measured rates."""
    hours = {name: sum(t * 1e12 / rates[kind] for kind, t in kinds.items()) / 3600 for name, kinds in parts_tflop.items()}
    return {"hours": {k: round(v, 2) for k, v in hours.items()}, "total_hours": round(sum(hours.values()), 2),
            "tflop_per_s": {k: round(v / 1e12, 4) for k, v in rates.items()}}
