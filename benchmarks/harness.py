"""Timing method, FLOP model and the benchmark cases.

Timing: every step is jitted (state donated, as in train.single_method); the first call (compile)
and `warmup` more calls are excluded; each timed call ends with jax.block_until_ready on the new
state and metrics; we report the median of `repeats` calls (and min/max). The machine is shared
(2 cores here, tests running beside us): os.getloadavg() is recorded before and after every case,
and the dense matmul rate is re-measured right before every case so that a case is compared with
the machine as it was at that moment.

FLOP model per step and member (B tokens, d = d_in, m = width, k, k_aux), multiply-add = 2 FLOPs:
  encoder                          2*B*d*m   (the unavoidable part: the bound)
  dense TopK step (sae.loss)      18*B*d*m   = encoder 2 + decoder 2 + backward (d codes 2,
                                               dW_dec 2, dW_enc 2, dx for b_dec 2) = 12, plus the
                                               AuxK decoder in the dense path (forward 2, backward
                                               d aux-codes 2, dW_dec 2) = 6, which sae.loss computes
                                               every step even with no dead latent
  sparse TopK step (kernels.py)    2*B*d*m + 8*B*k*d       (decode, d codes, dW_dec, dW_enc on
                                               the k kept latents) + AuxK 10*B*d*c per block of
                                               c = 256 dead latents (0 when none is dead)
The optimizer (a few passes over 4 [d, m] arrays) and top-k are not counted.
fraction of the encoder bound = (time of one jitted [B, d] x [d, m] matmul) / (step time)
  = tokens/s achieved / tokens/s if the step cost only the forward encoder matmul.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from saeens import bagging, kernels, train
from saeens.config import SAEConfig, TrainConfig
from saeens.optim import make_optimizer


@dataclass(frozen=True)
class Sizes:
    d: int = 576
    m: int = 4608
    k: int = 32
    batch: int = 4096
    repeats: int = 5
    warmup: int = 1


QUICK = Sizes(d=64, m=512, k=8, batch=256, repeats=3, warmup=1)


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tree_bytes(tree: Any) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(tree)))


def _ready(x):
    return jax.block_until_ready(x)


def time_calls(call: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    """call() runs one step (and keeps its own state); returns compile/first-call time and stats."""
    t0 = time.perf_counter()
    _ready(call())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        _ready(call())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ready(call())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "first_call_s": first, "times_s": times}


def matmul_time(s: Sizes, repeats: int = 5) -> float:
    """Median time of one jitted [B, d] x [d, m] float32 matmul (the encoder's shape)."""
    kx, kw = jax.random.split(jax.random.key(123))
    x = jax.random.normal(kx, (s.batch, s.d), jnp.float32)
    w = jax.random.normal(kw, (s.d, s.m), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    return time_calls(lambda: f(x, w), repeats, 2)["median_s"]


def enc_flops(s: Sizes) -> float:
    return 2.0 * s.batch * s.d * s.m


def model_flops(s: Sizes, kernel: str, n_dead: int = 0) -> float:
    if kernel == "dense":
        return 18.0 * s.batch * s.d * s.m
    blocks = -(-n_dead // kernels.AUX_BLOCK)
    return enc_flops(s) + 8.0 * s.batch * s.k * s.d + 10.0 * s.batch * s.d * min(s.m, kernels.AUX_BLOCK) * blocks


def batch_of(s: Sizes, seed: int = 0) -> jax.Array:
    """A fixed batch: random rows with a mean offset (the step time does not depend on the data
    except through which latents are selected)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.normal(size=(s.batch, s.d)) + rng.normal(size=(s.d,)), jnp.float32)


def sae_cfg(s: Sizes, arch: str, kernel: str) -> SAEConfig:
    return SAEConfig(d_in=s.d, width=s.m, arch=arch, k=s.k, kernel=kernel)


def _with_dead(state: train.TrainState, cfg: SAEConfig, n_dead: int) -> train.TrainState:
    if not n_dead:
        return state
    since = state.since_fired
    return state._replace(since_fired=since.at[..., :n_dead].set(cfg.dead_tokens))


def _update_from_summaries(params, opt_state, since_fired_M, x_BD, cfg, opt):
    """train.update with the proposed change: read aux["fired"/"l0"/"min_kept"] instead of
    reducing the dense aux["codes"] (so XLA drops the [B, m] codes scatter of the sparse kernel)."""
    from saeens import sae
    import optax

    dead_M = since_fired_M >= cfg.dead_tokens
    (loss, aux), grads = jax.value_and_grad(sae.loss, has_aux=True)(params, cfg, x_BD, dead_M)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if cfg.arch == "batchtopk":
        min_kept = jnp.where(jnp.isfinite(aux["min_kept"]), aux["min_kept"], params["threshold"][0])
        decay = cfg.batchtopk_threshold_decay
        first = jnp.all(params["threshold"] == 0)
        new = jnp.where(first, min_kept, decay * params["threshold"][0] + (1 - decay) * min_kept)
        params = params | {"threshold": jnp.full_like(params["threshold"], new)}
    since_fired_M = jnp.where(aux["fired"], 0, jnp.minimum(since_fired_M + x_BD.shape[0], cfg.dead_tokens))
    metrics = {"loss": loss, "mse": aux["mse"], "sparsity_loss": aux["sparsity_loss"], "l0": aux["l0"],
               "dead_fraction": jnp.mean(since_fired_M >= cfg.dead_tokens)}
    return params, opt_state, since_fired_M, metrics


def _make_step_summaries(cfg, opt):
    def step(state, x_BD, key):
        params, opt_state, since, metrics = _update_from_summaries(
            state.params, state.opt_state, state.since_fired, x_BD * state.scale, cfg, opt)
        return train.TrainState(params, opt_state, since, state.scale, state.step + 1), metrics

    return step


def single_case(s: Sizes, arch: str, kernel: str, n_dead: int = 0, summaries: bool = False) -> dict[str, Any]:
    """The real single-SAE step (train.make_step, real optimizer), jitted with donated state.

    summaries=True: the same step with the proposed train.update change (_update_from_summaries).
    """
    cfg = sae_cfg(s, arch, kernel)
    tcfg = TrainConfig(n_tokens=s.batch, batch_size=s.batch)
    opt = make_optimizer(tcfg)
    x = batch_of(s)
    state = _with_dead(train.init_state(jax.random.key(0), cfg, tcfg, x, opt), cfg, n_dead)
    step = jax.jit((_make_step_summaries if summaries else train.make_step)(cfg, opt), donate_argnums=0)
    key = jax.random.key(1)
    box = {"state": state, "metrics": None}

    def call():
        box["state"], box["metrics"] = step(box["state"], x, key)
        return box["state"], box["metrics"]

    load0, t_mm = loadavg(), matmul_time(s)
    timing = time_calls(call, s.repeats, s.warmup)
    t = timing["median_s"]
    flops = model_flops(s, kernel, n_dead)
    metrics = {k: float(np.mean(v)) for k, v in jax.device_get(box["metrics"]).items()}
    return {
        "case": f"{arch} single" + (f" dead={n_dead}" if n_dead else "") + (" +summaries" if summaries else ""), "arch": arch, "kernel": kernel,
        "members": 1, "n_dead_start": n_dead, **timing,
        "tokens_per_s": s.batch / t, "member_tokens_per_s": s.batch / t,
        "model_flops": flops, "achieved_flops_per_s": flops / t,
        "matmul_s": t_mm, "matmul_flops_per_s": enc_flops(s) / t_mm,
        "ratio_to_matmul_rate": (flops / t) / (enc_flops(s) / t_mm),
        "fraction_of_encoder_bound": t_mm / t,
        "state_bytes_per_member": tree_bytes(box["state"]),
        "peak_rss_mb_so_far": peak_rss_mb(), "loadavg_before": load0, "loadavg_after": loadavg(),
        "dead_fraction_end": metrics.get("dead_fraction"), "l0_end": metrics.get("l0"),
    }


def bagging_case(s: Sizes, kernel: str, J: int, arch: str = "topk") -> dict[str, Any]:
    """One vmapped bagging step over J members vs J single steps run one after another."""
    cfg = sae_cfg(s, arch, kernel)
    tcfg = TrainConfig(n_tokens=s.batch, batch_size=s.batch)
    opt = make_optimizer(tcfg)
    x = batch_of(s)
    key = jax.random.key(1)
    rss0 = peak_rss_mb()
    load0, t_mm = loadavg(), matmul_time(s)

    stacked = bagging.init_members(jax.random.key(0), cfg, tcfg, x, J, opt)
    bag_step = jax.jit(bagging.make_bagging_step(cfg, opt), donate_argnums=0)
    box = {"state": stacked}

    def bag_call():
        box["state"], m = bag_step(box["state"], x, key)
        return box["state"], m

    reps = min(s.repeats, 3)  # dense J=8 steps take tens of seconds on 2 cores
    bag = time_calls(bag_call, reps, s.warmup)
    state_bytes = tree_bytes(box["state"])
    rss_bag = peak_rss_mb()
    box.clear()
    del stacked

    single = jax.jit(train.make_step(cfg, opt), donate_argnums=0)
    states = [train.init_state(k, cfg, tcfg, x, opt) for k in bagging.member_keys(jax.random.key(0), J)]

    def seq_call():
        out = []
        for j in range(J):
            states[j], m = single(states[j], x, key)
            out.append(m)
        return states, out

    seq = time_calls(seq_call, reps, s.warmup)
    tb, ts = bag["median_s"], seq["median_s"]
    flops = J * model_flops(s, kernel)
    return {
        "case": f"bagging J={J}", "arch": arch, "kernel": kernel, "members": J,
        "bagging": bag, "sequential": seq,
        "median_s": tb, "member_tokens_per_s": J * s.batch / tb, "tokens_per_s": s.batch / tb,
        "sequential_member_tokens_per_s": J * s.batch / ts,
        "vmap_over_sequential": ts / tb,
        "model_flops": flops, "achieved_flops_per_s": flops / tb,
        "matmul_s": t_mm, "matmul_flops_per_s": enc_flops(s) / t_mm,
        "ratio_to_matmul_rate": (flops / tb) / (enc_flops(s) / t_mm),
        "fraction_of_encoder_bound": J * t_mm / tb,
        "state_bytes_per_member": state_bytes / J,
        "peak_rss_mb_before": rss0, "peak_rss_mb_after_vmapped": rss_bag,
        "loadavg_before": load0, "loadavg_after": loadavg(),
    }
