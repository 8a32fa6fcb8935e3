"""The host loop: `fit` trains (or resumes) a run directory with one of the methods.

Batch `step` is a pure function of (seed, step), the method's step is jitted once (saeens/train/
methods.py; with a mesh, saeens/sharding.py pins its layout), checkpoints are written every N
steps and at the end, and a resume continues from the last one, so an interrupted run ends with
the same parameters as an uninterrupted one. The log gets one row per `log_every` steps (the mean
since the previous row), at every checkpoint and, for boosting, at the end of every stage.

Batches come from a BatchSource (saeens/data/source.py) and are read, checked and put on the
device `prefetch` steps ahead on a background thread (saeens/train/prefetch.py), so the host's
reads overlap the device's step; a bad batch still fails at its own step. A boosting run reads
each stage from the source its Method names (the stage's residual cache, saeens/train/residual.py).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saeens import allocator, runs, sharding
from saeens.config import RunConfig, TrainConfig
from saeens.data.source import Activations, BatchSource, RowSource, as_source
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.io.files import atomic_write_text
from saeens.train import checkpoints, residual
from saeens.train.methods import Method, build_method
from saeens.train.prefetch import Prefetch

PREFETCH = 2  # batches read ahead of the step


def init_sample(data: BatchSource | Activations, tcfg: TrainConfig) -> np.ndarray:
    """A fixed, seeded sample of training rows for b_dec's geometric median and the norm scale."""
    return as_source(data).init_sample(tcfg.geometric_median_samples, tcfg.seed)


def fit(
    run_dir: str | Path,
    run: RunConfig,
    data: BatchSource | Activations,
    *,
    progress: bool = True,
    stop_after: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    prefetch: int = PREFETCH,
) -> Ensemble:
    """Train (or resume) the run in run_dir on a BatchSource (or rows by index: an activation
    cache, saeens/data/source.py); returns the final ensemble in activation units.

    A run directory holding another config or trained on another source is refused (saeens/
    runs.py); an attempt that fails before its first checkpoint leaves nothing behind. stop_after
    ends the loop early after that many steps (as an interruption would), leaving the last
    checkpoint in place: used to test resumption. mesh (saeens.sharding.make_mesh) trains with the
    state, each batch and the restored checkpoint on that mesh (any mesh resumes any checkpoint).
    prefetch: batches read, checked and put on the device ahead of the step (0: in the step's turn).
    """
    run_dir = Path(run_dir)
    allocator.keep_freed_memory()  # a step's large buffers reuse heap memory (saeens/allocator.py)
    source = as_source(data)
    sample = jnp.asarray(source.init_sample(run.train.geometric_median_samples, run.train.seed))
    if sample.shape[-1] != run.sae.d_in:
        raise SaeensError(f"activations have d_in={sample.shape[-1]} but the run expects {run.sae.d_in}: use a matching cache")
    described = runs.source_of(source)
    writer = jax.process_index() == 0  # one process checks and writes the run's files and log
    if writer:
        runs.check(run_dir, run, described)
    run_dir.mkdir(parents=True, exist_ok=True)
    # boosting reads each stage's residual from a cache written at the stage's start when the rows
    # can be read by index on one process; otherwise (a stream, several hosts) its step computes it
    method = build_method(run, residual_cache=isinstance(source, RowSource) and jax.process_count() == 1)
    try:
        return _train(run_dir, run, method, source, sample, described, progress, stop_after, mesh, writer, prefetch)
    except BaseException:
        if writer:
            runs.discard_unstarted(run_dir)
        raise


def _train(
    run_dir: Path, run: RunConfig, method: Method, source: BatchSource, sample: jax.Array, described: dict[str, Any],
    progress: bool, stop_after: int | None, mesh: jax.sharding.Mesh | None, writer: bool, prefetch: int,
) -> Ensemble:
    from tqdm.auto import tqdm

    tcfg = run.train
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
    bar = tqdm(total=method.n_steps, initial=start, disable=not progress, desc=_bar_desc(start, method), unit="step")
    window: list[dict[str, jax.Array]] = []
    with open(log_path if writer else os.devnull, "a") as log:
        for lo, hi in _segments(start, end, S):  # a boosting stage reads its own source
            bar.set_description(_bar_desc(lo, method))
            stage_source = source if method.stage_source is None else method.stage_source(run_dir, source, state, lo // S)
            fetch = functools.partial(_device_batch, stage_source, tcfg, mesh)
            if method.prepare is not None:  # a segment starts where a stage may start, never inside one
                state = method.prepare(state, lo, sample)
            stage = None if S is None else jnp.int32(lo // S)
            running = state if method.enter is None else method.enter(state, stage)  # what the step trains
            with _batches(fetch, range(lo, hi), prefetch) as batches:
                for step in range(lo, hi):
                    running, metrics = method.step(running, batches.get(step), jax.random.fold_in(step_key, step))
                    window.append(metrics)  # device scalars: no host sync until the log step
                    bar.update(1)
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
                        state = running if method.leave is None else method.leave(state, stage, running)
                        if writer and not recorded:  # the config goes with the first step there is to resume
                            runs.record(run_dir, run, described)
                            recorded = True
                        checkpoints.save(mngr, done, state)
            state = running if method.leave is None else method.leave(state, stage, running)
    bar.close()
    mngr.wait_until_finished()
    ens = method.to_ensemble(state)
    if checkpoints.step_of(state) == method.n_steps and writer:
        residual.discard(run_dir)  # no stage reads it again
        info = {"model": described.get("model"), "hook": described.get("hook"), "source": described,
                # metrics.jsonl is in scaled units: its mse / input_scale**2 is in activation units
                "input_scale": float(np.ravel(jax.device_get(state.scale))[0]),
                "train_seconds_last_session": time.perf_counter() - t0}
        runs.save_ensemble(run_dir, run, ens, info)
    return ens


def _segments(start: int, end: int, steps_per_stage: int | None) -> list[tuple[int, int]]:
    """[start, end) cut at stage boundaries (boosting), else whole."""
    if steps_per_stage is None:
        return [(start, end)] if start < end else []
    cuts = range((start // steps_per_stage + 1) * steps_per_stage, end, steps_per_stage)
    bounds = [start, *cuts, end]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b]


def _device_batch(source: BatchSource, tcfg: TrainConfig, mesh: jax.sharding.Mesh | None, step: int) -> jax.Array:
    """Batch `step` read, checked and on the device (under a mesh: this process's rows only)."""
    if mesh is None:
        return jax.device_put(source.batch(step, tcfg.batch_size, tcfg.seed))
    return sharding.source_batch(source, step, tcfg.batch_size, tcfg.seed, mesh)


class _InTurn:
    """Batches fetched when the step asks for them (prefetch 0): the same interface as Prefetch."""

    def __init__(self, fetch: Callable[[int], Any]):
        self.get = fetch

    def __enter__(self) -> _InTurn:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def _batches(fetch: Callable[[int], Any], steps: range, depth: int) -> Prefetch | _InTurn:
    return Prefetch(fetch, steps, depth) if depth > 0 else _InTurn(fetch)


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
