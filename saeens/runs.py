"""The run directory: what a run is, what it trains on, and the ensemble it ends with.

  config.json            the RunConfig; written with the first checkpoint, so a directory holding
                         it always holds a step to resume from (a run that failed before its first
                         checkpoint leaves no config behind)
  activations.json       the source: cache path, d_in, training rows, model, hook, dataset, split seed
                         (a stream from the model, kind "stream": also test fraction, context length
                         and shuffle buffer, which decide its data order)
  checkpoints/, metrics.jsonl   written by the training loop
  ensemble.json + ensemble.safetensors   the finished ensemble in activation units, with the seed,
                         method, arch, width, members and source, so later tools can check what
                         they compare

A resume with another config or another source is refused with a one-line SaeensError.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from saeens.config import RunConfig, SAEConfig
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.io.files import atomic_write, atomic_write_json, read_json

CONFIG, SOURCE, LOG, CHECKPOINTS = "config.json", "activations.json", "metrics.jsonl", "checkpoints"
ENSEMBLE_META, ENSEMBLE_WEIGHTS = "ensemble.json", "ensemble.safetensors"
# what an attempt that never reached its first checkpoint may leave (a SIGKILL skips the cleanup)
RESIDUAL = "residual"  # a boosting run's residual cache (saeens/train/residual.py)
UNSTARTED = {LOG, CHECKPOINTS, SOURCE, RESIDUAL}
_SOURCE_KEYS = ("kind", "d_in", "train_rows", "model", "hook", "dataset", "split_seed", "test_fraction",
                "context_length", "buffer_contexts")  # must match on resume (where recorded)


def source_of(source: Any) -> dict[str, Any]:
    """What a run trains on, as its BatchSource describes it (saeens/data/source.py): for a cache,
    its path, d_in, training rows, model, hook, dataset and split seed."""
    return dict(source.describe())


def has_checkpoint(run_dir: str | Path) -> bool:
    """Whether a finished checkpoint step exists (orbax names them by the step; temporaries differ)."""
    d = Path(run_dir) / CHECKPOINTS
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


def check(run_dir: str | Path, run: RunConfig, source: dict[str, Any]) -> None:
    """run_dir is new, or holds this run to resume: refuses another config, another source, or a
    directory that holds something else."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).is_file():
        if RunConfig.load(run_dir / CONFIG) != run:
            raise SaeensError(
                f"{run_dir} holds a run with a different config: use a new --out, or repeat the original flags to resume"
            )
        if (run_dir / SOURCE).is_file():
            old = read_json(run_dir / SOURCE, "run source", "retrain into a new --out")
            if any(old.get(k) is not None and old.get(k) != source.get(k) for k in _SOURCE_KEYS):
                if "stream" in (old.get("kind"), source.get("kind")):
                    raise SaeensError(f"{run_dir} was trained on {_in_words(old)}, not on {_in_words(source)}: repeat "
                                      "the original --activations or --model flags to resume, or use a new --out")
                raise SaeensError(
                    f"{run_dir} was trained on {old.get('path')} ({old.get('train_rows')} rows), not on this cache "
                    f"({source['train_rows']} rows): resume with the original --activations or use a new --out"
                )
        return
    if has_checkpoint(run_dir):  # a run of a version that wrote no config.json: adopt it
        return
    if run_dir.is_dir() and any(p.name not in UNSTARTED and not p.name.endswith(".tmp") for p in run_dir.iterdir()):
        raise SaeensError(f"{run_dir} is not empty and holds no run: choose a new --out")
    return False


def _in_words(source: dict[str, Any]) -> str:
    if source.get("kind") != "stream":
        return f"the cache {source.get('path')} ({source.get('train_rows')} rows)"
    return (f"the stream of {source.get('model')} at {source.get('hook')} on {source.get('dataset')} (split seed "
            f"{source.get('split_seed')}, test fraction {source.get('test_fraction')}, context length "
            f"{source.get('context_length')}, buffer of {source.get('buffer_contexts')} contexts)")


def record(run_dir: str | Path, run: RunConfig, source: dict[str, Any]) -> None:
    """config.json and activations.json (source first: a config never exists without it)."""
    atomic_write_json(Path(run_dir) / SOURCE, source)
    atomic_write_json(Path(run_dir) / CONFIG, run.to_dict())


def discard_unstarted(run_dir: str | Path) -> None:
    """Remove what an attempt left that failed before its first checkpoint (the directory too, when
    that leaves it empty): the next attempt starts clean instead of 'resuming' nothing."""
    run_dir = Path(run_dir)
    if (run_dir / CONFIG).is_file() or has_checkpoint(run_dir):
        return
    for name in UNSTARTED:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def save_ensemble(run_dir: str | Path, run: RunConfig, ens: Ensemble, info: dict[str, Any]) -> None:
    """The trained ensemble in activation units: ensemble.safetensors + ensemble.json."""
    from safetensors.numpy import save

    run_dir = Path(run_dir)
    arrays = {k: np.asarray(v, np.float32) for k, v in ens.params.items()}
    arrays["weights"] = np.asarray(ens.weights, np.float32)
    atomic_write(run_dir / ENSEMBLE_WEIGHTS, lambda f: f.write(save(arrays)), mode="wb")
    meta = {"method": run.ensemble.method, "members": ens.n_members, "sequential": ens.sequential,
            "seed": run.train.seed, "arch": ens.cfg.arch, "width": ens.cfg.width,
            "sae": dataclasses.asdict(ens.cfg), **info}
    atomic_write_json(run_dir / ENSEMBLE_META, meta)


def load_ensemble(run_dir: str | Path) -> tuple[Ensemble, dict[str, Any]]:
    """A finished run's ensemble and its metadata (method, members, seed, source, ...)."""
    from safetensors.numpy import load_file

    run_dir = Path(run_dir)
    meta_path, weights_path = run_dir / ENSEMBLE_META, run_dir / ENSEMBLE_WEIGHTS
    if not meta_path.is_file() or not weights_path.is_file():
        if (run_dir / "meta.json").is_file():
            raise SaeensError(f"{run_dir} is an activation cache, not a run: pass the directory that `saeens train --out RUN` wrote")
        if (run_dir / CONFIG).is_file():
            raise SaeensError(f"{run_dir} holds an unfinished run: finish it by repeating its saeens train command")
        raise SaeensError(f"{run_dir} holds no finished run (no ensemble.json): pass the directory that `saeens train --out RUN` wrote")
    meta = read_json(meta_path, "ensemble metadata", "retrain it into a new --out")
    try:
        arrays = load_file(str(weights_path))
        weights = jnp.asarray(arrays.pop("weights"))
        cfg = SAEConfig(**meta["sae"])
        sequential = bool(meta["sequential"])
    except SaeensError:
        raise
    except Exception as e:
        raise SaeensError(f"the run in {run_dir} is corrupt ({type(e).__name__}): retrain it into a new --out") from None
    params = {k: jnp.asarray(v) for k, v in arrays.items()}
    return Ensemble(params, weights, cfg, sequential=sequential), meta
