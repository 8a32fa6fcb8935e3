"""A boosting stage's input residual, computed once per stage into the run directory.

Stage j trains on x * scale minus what stages 0..j-1 reconstruct, each from the residual the
stages before it leave. Recomputing that chain in every step costs j stage forwards per step;
instead, when stage j starts, one pass writes the residual of every training row that stages
j..J-1 will read (`stage_rows`) to RUN/residual/stage_J.npy, and stage j's steps read it by the
batch indices of the raw rows (`ResidualSource`). Stage j's file is built from stage j-1's (one
stage forward per row); only when that file is gone (deleted by hand) is it rebuilt from the raw
rows through the whole chain. Stage j-1's file is removed once stage j's is complete, so a kill at
any point resumes exactly, and the directory is removed when the run finishes.

A file is trusted only beside its marker, written after the data and naming a digest of what
produced it (the frozen stages, the input scale, the data order): a torn or stale file is rebuilt,
never read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saeens import runs, sharding
from saeens.config import SAEConfig, TrainConfig
from saeens.data.cache import batch_indices
from saeens.data.source import BatchSource, RowSource
from saeens.errors import SaeensError
from saeens.io.files import atomic_write, atomic_write_json, read_json
from saeens.train.boosting import stage_residual
from saeens.train.prefetch import Prefetch
from saeens.train.step import TrainState

DIR = runs.RESIDUAL
CHUNK_ROWS = 2048  # rows per compiled pass (the last chunk is padded): one program for every chunk


class ResidualSource:
    """Stage j's batches: the residual rows of the raw batch's rows, from the stage's cache file."""

    def __init__(self, base: RowSource, rows_U: np.ndarray, r_UD: np.ndarray):
        self.base, self.rows_U, self.r_UD, self.d_in = base, rows_U, r_UD, base.d_in

    def describe(self) -> dict[str, Any]:
        return self.base.describe()

    def init_sample(self, n: int, seed: int) -> np.ndarray:
        return self.base.init_sample(n, seed)

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
        idx_B = batch_indices(self.base.n_train, batch_size, seed, step)[rows]
        pos_B = np.searchsorted(self.rows_U, idx_B)
        if not np.array_equal(self.rows_U[np.minimum(pos_B, len(self.rows_U) - 1)], idx_B):
            raise SaeensError(f"step {step} reads training rows that its stage's residual cache does not hold: "
                              f"delete the run's {DIR}/ directory and resume")
        order = np.argsort(pos_B)  # sorted reads are sequential on disk
        out_BD = np.empty((idx_B.shape[0], self.d_in), np.float32)
        out_BD[order] = self.r_UD[pos_B[order]]
        return out_BD


def stage_rows(n_train: int, tcfg: TrainConfig, first_step: int, end_step: int) -> np.ndarray:
    """Sorted training rows that steps first_step..end_step-1 read (all rows once they cover an epoch)."""
    if (end_step - first_step) * tcfg.batch_size >= n_train:
        return np.arange(n_train, dtype=np.int64)
    return np.unique(np.concatenate([batch_indices(n_train, tcfg.batch_size, tcfg.seed, s)
                                     for s in range(first_step, end_step)]))


def stage_source(
    run_dir: Path, base: RowSource, state: TrainState, cfg: SAEConfig, tcfg: TrainConfig, stage: int, stages: int,
) -> BatchSource:
    """The source stage `stage`'s steps read: the raw rows at stage 0, else its residual cache
    (reused when its marker matches, else built now)."""
    if stage == 0:
        return base
    S, d = tcfg.n_steps, run_dir / DIR
    host = sharding.to_host((state.params, state.scale))
    params_J, scale = host[0], np.float32(np.ravel(host[1])[0])
    rows = {j: stage_rows(base.n_train, tcfg, j * S, stages * S) for j in (stage - 1, stage)}
    digests = {j: _digest(params_J, scale, j, rows[j], tcfg) for j in (stage - 1, stage)}
    if not _trusted(d, stage, digests[stage], len(rows[stage]), base.d_in):
        prev = stage - 1 if stage > 1 and _trusted(d, stage - 1, digests[stage - 1], len(rows[stage - 1]), base.d_in) else None
        d.mkdir(exist_ok=True)
        _marker(d, stage).unlink(missing_ok=True)
        _build(d, base, params_J, scale, cfg, stage, rows, prev)
        atomic_write_json(_marker(d, stage), {"stage": stage, "rows": len(rows[stage]), "d_in": base.d_in,
                                              "digest": digests[stage]})
    for p in d.iterdir():  # earlier stages' files and temporaries of a killed build
        if p.name not in (_data(d, stage).name, _marker(d, stage).name):
            p.unlink()
    return ResidualSource(base, rows[stage], np.load(_data(d, stage), mmap_mode="r"))


def discard(run_dir: Path) -> None:
    """Remove the residual cache (the run is finished: no stage will read it again)."""
    shutil.rmtree(run_dir / DIR, ignore_errors=True)


def _data(d: Path, stage: int) -> Path:
    return d / f"stage_{stage:03d}.npy"


def _marker(d: Path, stage: int) -> Path:
    return d / f"stage_{stage:03d}.json"


def _digest(params_J: dict[str, np.ndarray], scale: np.float32, stage: int, rows_U: np.ndarray, tcfg: TrainConfig) -> str:
    """What stage `stage`'s residual depends on: stages 0..stage-1, the scale, its rows, the chunking."""
    h = hashlib.sha256(json.dumps([stage, CHUNK_ROWS, tcfg.seed, tcfg.batch_size]).encode())
    for name in sorted(params_J):
        h.update(name.encode() + np.ascontiguousarray(params_J[name][:stage]).tobytes())
    h.update(scale.tobytes() + np.ascontiguousarray(rows_U).tobytes())
    return h.hexdigest()


def _trusted(d: Path, stage: int, digest: str, n_rows: int, d_in: int) -> bool:
    marker, data = _marker(d, stage), _data(d, stage)
    if not (marker.is_file() and data.is_file()):
        return False
    try:
        meta = read_json(marker, "residual cache marker", "it is rebuilt")
        r = np.load(data, mmap_mode="r")
    except (SaeensError, ValueError, OSError):  # torn or foreign: rebuilt
        return False
    return meta.get("digest") == digest and r.shape == (n_rows, d_in) and r.dtype == np.float32


@functools.lru_cache(maxsize=8)
def _link(cfg: SAEConfig) -> Callable:
    """One stage's residual, jitted once per config (every stage and chunk reuses the program)."""
    return jax.jit(lambda p, r: stage_residual(p, cfg, r))


def _build(
    d: Path, base: RowSource, params_J: dict[str, np.ndarray], scale: np.float32, cfg: SAEConfig, stage: int,
    rows: dict[int, np.ndarray], prev: int | None,
) -> None:
    """Write stage `stage`'s residual rows chunk by chunk: from stage prev's file through one stage,
    or (prev None) from the raw rows scaled, through stages 0..stage-1."""
    rows_U, first = rows[stage], (0 if prev is None else prev)
    r_prev = None if prev is None else np.load(_data(d, prev), mmap_mode="r")
    link = _link(cfg)
    stage_params = [jax.tree.map(lambda a, j=j: jnp.asarray(a[j]), params_J) for j in range(first, stage)]

    def read(c: int) -> jax.Array:
        idx = rows_U[c * CHUNK_ROWS:(c + 1) * CHUNK_ROWS]
        if r_prev is None:
            x = base.rows(idx) * scale
        else:
            x = np.asarray(r_prev[np.searchsorted(rows[prev], idx)])
        return jnp.asarray(np.pad(x, ((0, CHUNK_ROWS - len(idx)), (0, 0))))

    n_chunks = -(-len(rows_U) // CHUNK_ROWS)

    def write(f) -> None:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (len(rows_U), base.d_in)})
        def flush(c: int, r: jax.Array) -> None:
            f.write(np.asarray(r, "<f4")[: min(CHUNK_ROWS, len(rows_U) - c * CHUNK_ROWS)].tobytes())

        pending = None
        with Prefetch(read, range(n_chunks)) as chunks:
            for c in range(n_chunks):
                r = chunks.get(c)
                for p in stage_params:
                    r = link(p, r)
                if pending is not None:  # chunk c is dispatched before chunk c-1 is waited for
                    flush(*pending)
                pending = (c, r)
        if pending is not None:
            flush(*pending)

    atomic_write(_data(d, stage), write, mode="wb")
