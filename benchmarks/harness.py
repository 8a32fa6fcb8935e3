"""Timing method, FLOP model and the benchmark cases.

Timing: every step is the library's own jitted step (saeens.train.step.make_step or
saeens.train.bagging.make_bagging_step with the real optimizer, state donated as in training);
the first call (compile) and `warmup` more calls are excluded; each timed call ends with
jax.block_until_ready on the new state and metrics. We report the median and the minimum of
`repeats` calls, in wall time and in this process's CPU time. The machine may be shared: the
minimum is the figure least disturbed by other work, os.getloadavg() is recorded before and after
every case, and the dense matmul is re-timed right before every case so that a case is compared
with the machine as it was at that moment.

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
The optimizer (a few passes over the [d, m] arrays) and top-k are not counted.
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

from saeens import auxk
from saeens.config import SAEConfig, TrainConfig
from saeens.optim import make_optimizer
from saeens.train import bagging
from saeens.train.step import TrainState, init_state, make_step


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


def timed(call: Callable[[], Any]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call, finished with block_until_ready."""
    t0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(call())
    return time.perf_counter() - t0, time.process_time() - c0


def stats(walls: list[float], cpus: list[float]) -> dict[str, Any]:
    return {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls),
            "min_cpu_s": min(cpus), "times_s": walls, "cpu_times_s": cpus}


def time_calls(call: Callable[[], Any], repeats: int, warmup: int) -> dict[str, Any]:
    """call() runs one step (and keeps its own state); returns compile/first-call time and stats."""
    first, _ = timed(call)
    for _ in range(warmup):
        timed(call)
    walls, cpus = zip(*(timed(call) for _ in range(repeats)))
    return {**stats(list(walls), list(cpus)), "first_call_s": first}


def matmul_time(s: Sizes, repeats: int = 5) -> float:
    """Minimum time of one jitted [B, d] x [d, m] float32 matmul (the encoder's shape)."""
    kx, kw = jax.random.split(jax.random.key(123))
    x = jax.random.normal(kx, (s.batch, s.d), jnp.float32)
    w = jax.random.normal(kw, (s.d, s.m), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    return time_calls(lambda: f(x, w), repeats, 2)["min_s"]


def enc_flops(s: Sizes) -> float:
    return 2.0 * s.batch * s.d * s.m


def model_flops(s: Sizes, kernel: str, n_dead: int = 0, arch: str = "topk") -> float:
    if kernel == "dense":  # ReLU and JumpReLU have no AuxK
        return (18.0 if arch in ("topk", "batchtopk") else 12.0) * s.batch * s.d * s.m
    blocks = -(-n_dead // auxk.AUX_BLOCK)
    return enc_flops(s) + 8.0 * s.batch * s.k * s.d + 10.0 * s.batch * s.d * min(s.m, auxk.AUX_BLOCK) * blocks


def batch_of(s: Sizes, seed: int = 0) -> np.ndarray:
    """A fixed batch: random rows with a mean offset (the step time does not depend on the data
    except through which latents are selected)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(s.batch, s.d)) + rng.normal(size=(s.d,))).astype(np.float32)


def sae_cfg(s: Sizes, arch: str, kernel: str) -> SAEConfig:
    return SAEConfig(d_in=s.d, width=s.m, arch=arch, k=s.k, kernel=kernel)


def train_cfg(s: Sizes) -> TrainConfig:
    """The paper's optimizer settings (Adam beta1 = 0, clip 1, lr 3e-4): what the peer runs too."""
    return TrainConfig(n_tokens=s.batch, batch_size=s.batch)


def with_dead(state: TrainState, cfg: SAEConfig, n_dead: int) -> TrainState:
    """The first n_dead latents silent for cfg.dead_tokens: AuxK runs on them at the first step."""
    if not n_dead:
        return state
    return state._replace(since_fired=state.since_fired.at[..., :n_dead].set(cfg.dead_tokens))


def single_stepper(s: Sizes, arch: str, kernel: str, n_dead: int = 0) -> tuple[Callable[[], Any], dict]:
    """One call = one real train step of one SAE on the fixed batch; box["state"] holds the state."""
    cfg, tcfg = sae_cfg(s, arch, kernel), train_cfg(s)
    opt = make_optimizer(tcfg)
    x = jnp.asarray(batch_of(s))
    box = {"state": with_dead(init_state(jax.random.key(0), cfg, tcfg, x, opt), cfg, n_dead), "metrics": None}
    step = jax.jit(make_step(cfg, opt), donate_argnums=0)
    key = jax.random.key(1)

    def call():
        box["state"], box["metrics"] = step(box["state"], x, key)
        return box["state"], box["metrics"]

    return call, box


def _rates(s: Sizes, t: float, t_mm: float, flops: float, members: int = 1) -> dict[str, float]:
    return {"tokens_per_s": s.batch / t, "member_tokens_per_s": members * s.batch / t,
            "model_flops": flops, "achieved_flops_per_s": flops / t,
            "matmul_s": t_mm, "matmul_flops_per_s": enc_flops(s) / t_mm,
            "ratio_to_matmul_rate": (flops / t) / (enc_flops(s) / t_mm),
            "fraction_of_encoder_bound": members * t_mm / t}


def single_case(s: Sizes, arch: str, kernel: str, n_dead: int = 0) -> dict[str, Any]:
    """The real single-SAE step, timed; rates from the minimum over the repeats."""
    call, box = single_stepper(s, arch, kernel, n_dead)
    load0, t_mm = loadavg(), matmul_time(s)
    timing = time_calls(call, s.repeats, s.warmup)
    metrics = {k: float(np.mean(v)) for k, v in jax.device_get(box["metrics"]).items()}
    return {
        "case": f"{arch} single" + (f" dead={n_dead}" if n_dead else ""), "arch": arch, "kernel": kernel,
        "members": 1, "n_dead_start": n_dead, **timing,
        **_rates(s, timing["min_s"], t_mm, model_flops(s, kernel, n_dead, arch)),
        "state_bytes_per_member": tree_bytes(box["state"]),
        "peak_rss_mb_so_far": peak_rss_mb(), "loadavg_before": load0, "loadavg_after": loadavg(),
        "dead_fraction_end": metrics.get("dead_fraction"), "l0_end": metrics.get("l0"),
    }


def bagging_case(s: Sizes, kernel: str, J: int, arch: str = "topk") -> dict[str, Any]:
    """One compiled bagging step over J members vs J single steps run one after another."""
    cfg, tcfg = sae_cfg(s, arch, kernel), train_cfg(s)
    opt = make_optimizer(tcfg)
    x = jnp.asarray(batch_of(s))
    key = jax.random.key(1)
    rss0 = peak_rss_mb()
    load0, t_mm = loadavg(), matmul_time(s)

    box = {"state": bagging.init_members(jax.random.key(0), cfg, tcfg, x, J, opt)}
    bag_step = jax.jit(bagging.make_bagging_step(cfg, opt), donate_argnums=0)

    def bag_call():
        box["state"], m = bag_step(box["state"], x, key)
        return box["state"], m

    reps = min(s.repeats, 3)  # dense J=8 steps take tens of seconds on 2 cores
    bag = time_calls(bag_call, reps, s.warmup)
    state_bytes = tree_bytes(box["state"])
    rss_bag = peak_rss_mb()
    box.clear()

    single = jax.jit(make_step(cfg, opt), donate_argnums=0)
    states = [init_state(k, cfg, tcfg, x, opt) for k in bagging.member_keys(jax.random.key(0), J)]

    def seq_call():
        out = []
        for j in range(J):
            states[j], m = single(states[j], x, key)
            out.append(m)
        return states, out

    seq = time_calls(seq_call, reps, s.warmup)
    tb, ts = bag["min_s"], seq["min_s"]
    return {
        "case": f"bagging J={J}", "arch": arch, "kernel": kernel, "members": J,
        "bagging": bag, "sequential": seq, "median_s": bag["median_s"], "min_s": tb,
        **_rates(s, tb, t_mm, J * model_flops(s, kernel, arch=arch), members=J),
        "sequential_member_tokens_per_s": J * s.batch / ts,
        "vmap_over_sequential": ts / tb,
        "state_bytes_per_member": state_bytes / J,
        "peak_rss_mb_before": rss0, "peak_rss_mb_after_bagging": rss_bag,
        "loadavg_before": load0, "loadavg_after": loadavg(),
    }
