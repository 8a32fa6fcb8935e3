"""The host loop: `fit` trains (or resumes) a run directory with one of the methods.

Batch `step` is a pure function of (seed, step), the method's step is jitted once (saeens/train/
methods.py; with a mesh, saeens/sharding.py pins its layout), checkpoints are written every N
steps and at the end, and a resume continues from the last one, so an interrupted run ends with
the same parameters as an uninterrupted one. The log gets one row per `log_every` steps (the mean
since the previous row), at every checkpoint and, for boosting, at the end of every stage.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from saeens import runs, sharding
from saeens.config import RunConfig, TrainConfig
from saeens.data.cache import batch_indices
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.io.files import atomic_write_text
from saeens.train import checkpoints
from saeens.train.methods import Method, build_method


class Activations(Protocol):
    """What training reads: the train split's size and rows by index (ActivationCache has both)."""

    def n_rows(self, split: str = "train") -> int: ...

    def gather(self, idx_N: np.ndarray, split: str = "train") -> np.ndarray: ...


def init_sample(acts: Activations, tcfg: TrainConfig) -> np.ndarray:
    """A fixed, seeded sample of training rows for b_dec's geometric median and the norm scale."""
    n = acts.n_rows("train")
    rng = np.random.default_rng([tcfg.seed, 1 << 30])
    idx = np.sort(rng.choice(n, size=min(n, tcfg.geometric_median_samples), replace=False))
    sample = acts.gather(idx, "train")
    check_batch(acts, sample, idx)
    return sample


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

    A run directory holding another config or trained on another source is refused (saeens/
    runs.py); an attempt that fails before its first checkpoint leaves nothing behind. stop_after
    ends the loop early after that many steps (as an interruption would), leaving the last
    checkpoint in place: used to test resumption. mesh (saeens.sharding.make_mesh) trains with the
    state, each batch and the restored checkpoint on that mesh (any mesh resumes any checkpoint).
    """
    run_dir = Path(run_dir)
    if not getattr(acts, "meta", {}).get("complete", True):
        raise SaeensError("the activation cache is incomplete (its saeens cache run was cut short): re-run the same saeens cache command to finish it")
    if acts.n_rows("train") < 1:
        raise SaeensError("the activation cache has no training rows: rebuild it with more tokens")
    sample = jnp.asarray(init_sample(acts, run.train))
    if sample.shape[-1] != run.sae.d_in:
        raise SaeensError(f"activations have d_in={sample.shape[-1]} but the run expects {run.sae.d_in}: use a matching cache")
    source = runs.source_of(acts, run.sae.d_in)
    writer = jax.process_index() == 0  # one process checks and writes the run's files and log
    if writer:
        runs.check(run_dir, run, source)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _train(run_dir, run, build_method(run), acts, sample, source, progress, stop_after, mesh, writer)
    except BaseException:
        if writer:
            runs.discard_unstarted(run_dir)
        raise


def _train(
    run_dir: Path, run: RunConfig, method: Method, acts: Activations, sample: jax.Array, source: dict[str, Any],
    progress: bool, stop_after: int | None, mesh: jax.sharding.Mesh | None, writer: bool,
) -> Ensemble:
    from tqdm.auto import tqdm

    tcfg, n_train = run.train, acts.n_rows("train")
    init_key, step_key = jax.random.split(jax.random.key(tcfg.seed))
    abstract = jax.eval_shape(method.init, init_key, sample)
    if mesh is not None:  # state, batches and checkpoints on the mesh
        stacked = sharding.is_stacked(run.ensemble.method)
        method = sharding.shard_method(method, mesh, stacked)  # init places, step keeps the layout
        abstract = sharding.abstract_state(abstract, mesh, stacked)
    mngr = checkpoints.manager(run_dir)
    state = method.init(init_key, sample) if mngr.latest_step() is None else checkpoints.restore(mngr, abstract)
    start = checkpoints.step_of(state)
    if start and progress and writer:
        print(f"resuming the run in {run_dir} at step {start} of {method.n_steps}", file=sys.stderr)
    t0 = time.perf_counter()
    log_path = run_dir / runs.LOG
    if writer:
        truncate_log(log_path, start)
    recorded = (run_dir / runs.CONFIG).is_file()
    end = method.n_steps if stop_after is None else min(method.n_steps, start + stop_after)
    S = method.steps_per_stage
    bar = tqdm(range(start, end), total=method.n_steps, initial=start, disable=not progress,
               desc=_bar_desc(start, method), unit="step")
    window: list[dict[str, jax.Array]] = []
    with open(log_path if writer else os.devnull, "a") as log:
        for step in bar:
            if S is not None and step % S == 0:
                bar.set_description(_bar_desc(step, method))
            if method.prepare is not None:
                state = method.prepare(state, step, sample)
            idx_B = batch_indices(n_train, tcfg.batch_size, tcfg.seed, step)
            if mesh is None:
                x_BD = acts.gather(idx_B, "train")
                check_batch(acts, x_BD, idx_B)
            else:  # each process reads (and checks) only its rows
                x_BD = sharding.gather_batch(acts, idx_B, mesh, check=lambda x, i: check_batch(acts, x, i))
            state, metrics = method.step(state, x_BD, jax.random.fold_in(step_key, step))
            window.append(metrics)  # device scalars: no host sync until the log step
            done = step + 1
            is_ckpt = done == method.n_steps or (tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0)
            stage_end = S is not None and done % S == 0
            if done % tcfg.log_every == 0 or is_ckpt or done == end or stage_end:
                row = _log_row(jax.device_get(window), done, S, run_dir)
                window = []
                log.write(json.dumps(row) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{row['loss']:.4g}", l0=f"{row['l0']:.1f}", dead=f"{row['dead_fraction']:.2f}")
            if is_ckpt:
                if writer and not recorded:  # the config goes with the first step there is to resume
                    runs.record(run_dir, run, source)
                    recorded = True
                checkpoints.save(mngr, done, state)
    bar.close()
    mngr.wait_until_finished()
    ens = method.to_ensemble(state)
    if checkpoints.step_of(state) == method.n_steps and writer:
        info = {"model": source.get("model"), "hook": source.get("hook"), "source": source,
                # metrics.jsonl is in scaled units: its mse / input_scale**2 is in activation units
                "input_scale": float(np.ravel(jax.device_get(state.scale))[0]),
                "train_seconds_last_session": time.perf_counter() - t0}
        runs.save_ensemble(run_dir, run, ens, info)
    return ens


def _bar_desc(step: int, method: Method) -> str:
    S = method.steps_per_stage
    if S is None:
        return "train"
    return f"train stage {min(step // S, method.n_steps // S - 1) + 1}/{method.n_steps // S}"


def _log_row(rows: list[dict[str, Any]], done: int, steps_per_stage: int | None, run_dir: Path) -> dict[str, Any]:
    """The mean over the steps since the last row (and over members): one batch's outliers do not
    masquerade as a trend, and a non-finite loss anywhere in the window shows. Boosting rows name
    their stage (windows never span two)."""
    row: dict[str, Any] = {"step": done, **{k: float(np.mean([r[k] for r in rows])) for k in rows[0]}}
    if steps_per_stage is not None:
        row["stage"] = (done - 1) // steps_per_stage
    if not math.isfinite(row["loss"]):
        raise SaeensError(
            f"loss became {row['loss']} at step {done}: lower --lr or check the activations for "
            f"outliers; the last good checkpoint is kept in {run_dir / runs.CHECKPOINTS}"
        )
    return row


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log rows past the step we resume from (an interrupted run logged them before dying)."""
    if not log_path.is_file():
        return

    def step_of(line: str) -> float:
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):  # a line torn by a kill or a full disk
            return float("inf")

    lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if step_of(ln) <= step]
    if len(kept) != len(lines):
        atomic_write_text(log_path, "".join(ln + "\n" for ln in kept))


def check_batch(acts: Activations, x_BD: np.ndarray, idx_B: np.ndarray) -> None:
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
