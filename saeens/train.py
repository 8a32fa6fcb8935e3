"""Training: the train state, ONE pure update shared by every method, and the host loop.

`update` trains one SAE on one batch. Every method is built from it:
  single / expanded   jit(step)                       (expanded = one SAE of J*m latents)
  bagging             jit(vmap(step))                 saeens/bagging.py
  boosting            jit(step on stage `state.step // S`, input = residual of the frozen stages)
                                                       saeens/boosting.py
The host loop (`fit`) draws batch `step` as a pure function of (seed, step), checkpoints with
orbax every N steps and at the end, and resumes from the last checkpoint, so an interrupted run
ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from saeens import ensemble, sae
from saeens.config import RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import batch_indices
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.optim import make_optimizer
from saeens.sae import Params


class TrainState(NamedTuple):
    params: Params
    opt_state: optax.OptState
    since_fired: jax.Array  # [M] tokens since each latent last fired (capped at cfg.dead_tokens)
    scale: jax.Array  # input normalisation factor (1.0 when off); folded into params on export
    step: jax.Array  # int32 scalar


class Activations(Protocol):
    """What training reads: the train split's size and rows by index (ActivationCache has both)."""

    def n_rows(self, split: str = "train") -> int: ...

    def gather(self, idx_N: np.ndarray, split: str = "train") -> np.ndarray: ...


def norm_scale(sample_ND: jax.Array) -> jax.Array:
    """Factor that gives the inputs a mean norm of sqrt(d_in) (SAELens' normalisation)."""
    return jnp.sqrt(sample_ND.shape[-1]) / jnp.mean(jnp.linalg.norm(sample_ND, axis=-1))


def init_state(
    key: jax.Array, cfg: SAEConfig, tcfg: TrainConfig, sample_ND: jax.Array, opt: optax.GradientTransformation
) -> TrainState:
    """b_dec starts at the geometric median of the (scaled) sample."""
    scale = norm_scale(sample_ND) if tcfg.normalize_activations else jnp.float32(1.0)
    params = sae.init(key, cfg, sae.geometric_median(sample_ND * scale))
    return TrainState(params, opt.init(params), jnp.zeros((cfg.width,), jnp.int32), scale, jnp.int32(0))


def update(
    params: Params,
    opt_state: optax.OptState,
    since_fired_M: jax.Array,
    x_BD: jax.Array,
    cfg: SAEConfig,
    opt: optax.GradientTransformation,
) -> tuple[Params, optax.OptState, jax.Array, dict[str, jax.Array]]:
    """One optimisation step of one SAE on an already-scaled batch."""
    dead_M = since_fired_M >= cfg.dead_tokens
    (loss, aux), grads = jax.value_and_grad(sae.loss, has_aux=True)(params, cfg, x_BD, dead_M)
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    fired_M = aux["fired"]  # sae.loss's summaries: the sparse kernel then never builds [B, M] codes
    if cfg.arch == "batchtopk":  # inference threshold: EMA of the smallest code kept in training
        min_kept = aux["min_kept"]
        min_kept = jnp.where(jnp.isfinite(min_kept), min_kept, params["threshold"][0])
        decay = cfg.batchtopk_threshold_decay
        first = jnp.all(params["threshold"] == 0)
        new = jnp.where(first, min_kept, decay * params["threshold"][0] + (1 - decay) * min_kept)
        params = params | {"threshold": jnp.full_like(params["threshold"], new)}
    since_fired_M = jnp.where(fired_M, 0, jnp.minimum(since_fired_M + x_BD.shape[0], cfg.dead_tokens))
    metrics = {
        "loss": loss,
        "mse": aux["mse"],
        "sparsity_loss": aux["sparsity_loss"],
        "l0": aux["l0"],
        "dead_fraction": jnp.mean(since_fired_M >= cfg.dead_tokens),
    }
    return params, opt_state, since_fired_M, metrics


def make_step(cfg: SAEConfig, opt: optax.GradientTransformation) -> Callable:
    """The pure step `(state, raw batch, key) -> (state, metrics)` of one SAE.

    The key is part of the contract every method shares; the SAE losses here are deterministic.
    """

    def step(state: TrainState, x_BD: jax.Array, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        del key
        params, opt_state, since, metrics = update(
            state.params, state.opt_state, state.since_fired, x_BD * state.scale, cfg, opt
        )
        return TrainState(params, opt_state, since, state.scale, state.step + 1), metrics

    return step


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method as four functions: what `fit` needs and nothing else."""

    init: Callable[[jax.Array, jax.Array], Any]  # (key, sample_ND) -> state
    step: Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]  # jitted (state, batch, key)
    n_steps: int  # total steps (boosting: stages * steps per stage)
    to_ensemble: Callable[[Any], Ensemble]  # final state -> ensemble in activation units
    prepare: Callable[[Any, int, jax.Array], Any] | None = None  # (state, step, sample) before a step


def single_method(cfg: SAEConfig, tcfg: TrainConfig) -> Method:
    opt = make_optimizer(tcfg)
    return Method(
        init=lambda key, sample: init_state(key, cfg, tcfg, sample, opt),
        step=jax.jit(make_step(cfg, opt), donate_argnums=0),
        n_steps=tcfg.n_steps,
        to_ensemble=lambda s: ensemble.single(cfg, sae.fold_scale(s.params, cfg, s.scale)),
    )


@functools.lru_cache(maxsize=16)
def build_method(run: RunConfig) -> Method:
    """single | expanded | bagging | boosting -> its Method (cached: a config compiles once)."""
    from saeens import bagging, boosting  # they build on this module

    method, J = run.ensemble.method, run.ensemble.members
    if method == "single":
        return single_method(run.sae, run.train)
    if method == "expanded":
        return single_method(run.sae.replace(width=run.sae.width * J), run.train)
    if method == "bagging":
        return bagging.bagging_method(run.sae, run.train, J)
    return boosting.boosting_method(run.sae, run.train, J)


def init_sample(acts: Activations, tcfg: TrainConfig) -> np.ndarray:
    """A fixed, seeded sample of training rows for b_dec's geometric median and the norm scale."""
    n = acts.n_rows("train")
    rng = np.random.default_rng([tcfg.seed, 1 << 30])
    idx = np.sort(rng.choice(n, size=min(n, tcfg.geometric_median_samples), replace=False))
    sample = acts.gather(idx, "train")
    _check_batch(acts, sample, idx)
    return sample


def _checkpoint_manager(run_dir: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


def _restore(mngr, abstract_state: Any) -> Any:
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises many types for a torn or foreign checkpoint
        raise SaeensError(
            f"checkpoint {step} in {mngr.directory} is corrupt or from another config ({type(e).__name__}): "
            "delete that step's folder to fall back to the previous one, or train into a new --out"
        ) from None


def fit(
    run_dir: str | Path,
    run: RunConfig,
    acts: Activations,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
) -> Ensemble:
    """Train (or resume) the run in run_dir; returns the final ensemble in activation units.

    stop_after ends the loop early after that many steps (as an interruption would), leaving the
    last checkpoint in place: used to test resumption. mesh (saeens.sharding.make_mesh) trains with
    the state, each batch and the restored checkpoint on that mesh (any mesh resumes any checkpoint).
    """
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not getattr(acts, "meta", {}).get("complete", True):
        raise SaeensError("the activation cache is incomplete (its saeens cache run was cut short): re-run the same saeens cache command to finish it")
    n_train = acts.n_rows("train")
    if n_train < 1:
        raise SaeensError("the activation cache has no training rows: rebuild it with more tokens")
    method = build_method(run)
    tcfg = run.train
    sample = jnp.asarray(init_sample(acts, tcfg))
    if sample.shape[-1] != run.sae.d_in:
        raise SaeensError(f"activations have d_in={sample.shape[-1]} but the run expects {run.sae.d_in}: use a matching cache")
    init_key, step_key = jax.random.split(jax.random.key(tcfg.seed))
    abstract = jax.eval_shape(method.init, init_key, sample)
    if mesh is not None:  # state, batches and checkpoints on the mesh (saeens/sharding.py)
        from saeens import sharding

        stacked = sharding.is_stacked(run.ensemble.method)
        method = sharding.shard_method(method, mesh, stacked)  # init places, step keeps the layout
        abstract = sharding.abstract_state(abstract, mesh, stacked)
    mngr = _checkpoint_manager(run_dir)
    if mngr.latest_step() is not None:
        state = _restore(mngr, abstract)
    else:
        state = method.init(init_key, sample)
    start = _step_of(state)
    t0 = time.perf_counter()
    writer = jax.process_index() == 0  # one process writes the log and the final files
    log_path = run_dir / "metrics.jsonl"
    if writer:
        _truncate_log(log_path, start)
    end = method.n_steps if stop_after is None else min(method.n_steps, start + stop_after)
    bar = tqdm(range(start, end), total=method.n_steps, initial=start, disable=not progress, desc="train", unit="step")
    window: list[dict[str, jax.Array]] = []
    with open(log_path if writer else os.devnull, "a") as log:
        for step in bar:
            if method.prepare is not None:
                state = method.prepare(state, step, sample)
            idx_B = batch_indices(n_train, tcfg.batch_size, tcfg.seed, step)
            if mesh is None:
                x_BD = acts.gather(idx_B, "train")
                _check_batch(acts, x_BD, idx_B)
            else:  # each process reads (and checks) only its rows
                x_BD = sharding.gather_batch(acts, idx_B, mesh, check=lambda x, i: _check_batch(acts, x, i))
            state, metrics = method.step(state, x_BD, jax.random.fold_in(step_key, step))
            window.append(metrics)  # device scalars: no host sync until the log step
            done = step + 1
            is_ckpt = done == method.n_steps or (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0)
            if done % tcfg.log_every == 0 or is_ckpt or done == end:
                # the mean over the steps since the last row (and over members): one batch's outliers
                # do not masquerade as a trend, and a non-finite loss anywhere in the window shows
                rows = jax.device_get(window)
                window = []
                row = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
                if not math.isfinite(row["loss"]):
                    raise SaeensError(
                        f"loss became {row['loss']} at step {done}: lower --lr or check the activations for "
                        f"outliers; the last good checkpoint is kept in {run_dir / 'checkpoints'}"
                    )
                log.write(json.dumps({"step": done, **row}) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if is_ckpt:
                _save(mngr, done, state)
    bar.close()
    mngr.wait_until_finished()
    ens = method.to_ensemble(state)
    if _step_of(state) == method.n_steps and writer:
        source = getattr(acts, "meta", {})
        info = {"model": source.get("model"), "hook": source.get("hook"), "train_seconds_last_session": time.perf_counter() - t0}
        save_ensemble(run_dir, run, ens, info)
    return ens


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log rows past the step we resume from (an interrupted run logged them before dying)."""
    if not log_path.is_file():
        return
    from saeens.data.cache import atomic_write_text

    def step_of(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a kill or a full disk
            return float("inf")

    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if step_of(ln) <= step]
    if len(kept) != len(lines):
        atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))


def _check_batch(acts: Activations, x_BD: np.ndarray, idx_B: np.ndarray) -> None:
    """NaN/Inf rows would poison the parameters silently: name the shard and row instead."""
    if np.isfinite(x_BD).all():
        return
    row = int(idx_B[np.argmin(np.isfinite(x_BD).all(axis=1))])
    where = f"training row {row}"
    if hasattr(acts, "shards"):
        shards = acts.shards("train")
        bounds = np.cumsum([0] + [sh["rows"] for sh in shards])
        i = int(np.searchsorted(bounds, row, side="right") - 1)
        where = f"shard {shards[i]['acts']} row {row - int(bounds[i])}"
    raise SaeensError(f"{where} holds NaN/Inf activations: recompute the cache (e.g. in float32) or drop that shard")


def _step_of(state: Any) -> int:
    """The state's step (bagging stacks one per member, all equal)."""
    return int(np.ravel(jax.device_get(state.step))[0])


def _save(mngr, step: int, state: Any) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.StandardSave(state))


def save_ensemble(run_dir: Path, run: RunConfig, ens: Ensemble, info: dict[str, Any]) -> None:
    """The trained ensemble in activation units: ensemble.safetensors + ensemble.json."""
    from safetensors.numpy import save_file

    from saeens.data.cache import atomic_write_text

    arrays = {k: np.asarray(v, np.float32) for k, v in ens.params.items()}
    arrays["weights"] = np.asarray(ens.weights, np.float32)
    tmp = run_dir / "ensemble.safetensors.tmp"
    save_file(arrays, str(tmp))
    tmp.replace(run_dir / "ensemble.safetensors")
    meta = {"method": run.ensemble.method, "members": ens.n_members, "sequential": ens.sequential,
            "sae": dataclasses.asdict(ens.cfg), **info}
    atomic_write_text(run_dir / "ensemble.json", json.dumps(meta, indent=2))


def load_ensemble(run_dir: str | Path) -> tuple[Ensemble, dict[str, Any]]:
    """A finished run's ensemble and its metadata (method, members, ...)."""
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / "ensemble.json", run_dir / "ensemble.safetensors"
    if not meta_path.is_file() or not weights_path.is_file():
        raise SaeensError(f"{run_dir} holds no finished run (no ensemble.json): train it with `saeens train --out {run_dir}`")
    try:
        meta = json.loads(meta_path.read_text())
        arrays = load_file(str(weights_path))
        weights = jnp.asarray(arrays.pop("weights"))
        cfg = SAEConfig(**meta["sae"])
    except SaeensError:
        raise
    except Exception as e:
        raise SaeensError(f"the run in {run_dir} is corrupt ({type(e).__name__}): retrain it into a new --out") from None
    params = {k: jnp.asarray(v) for k, v in arrays.items()}
    return Ensemble(params, weights, cfg, sequential=bool(meta["sequential"])), meta
