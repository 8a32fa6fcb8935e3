"""Intrinsic evaluation of an ensemble on a split of activations: reconstruction, sparsity,
dead/dense latents, connectivity (one streaming pass) and the dictionary's diversity.

Connectivity needs the [F, F] co-firing matrix: streamed over every token while F <= max_cofire
(skipped, NaN, above), or taken on the first `connectivity_tokens` tokens of the split, where the
F x F product per chunk (2 n F^2 FLOPs) would dominate a sweep.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from saeens import ensemble, metrics
from saeens.config import SWEPT
from saeens.data.outliers import kept_view
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.io.files import read_json

MAX_COFIRE = 16384


@dataclasses.dataclass(frozen=True)
class IntrinsicConfig:
    split: str = "test"
    connectivity: bool = True  # False: no co-firing matrix at all (connectivity NaN)
    max_cofire: int = MAX_COFIRE  # features above which the streamed co-firing matrix is skipped
    connectivity_tokens: int | None = None  # co-firing on the split's first n tokens instead (None: all)
    progress: bool = False


@dataclasses.dataclass(frozen=True)
class IntrinsicResult:
    mse: float
    explained_variance: float
    explained_variance_pooled: float
    explained_variance_per_token: float
    fvu: float
    l0: float
    relative_reconstruction_bias: float
    dead_fraction: float
    dense_fraction: float
    connectivity: float
    n_tokens: int
    diversity: int
    diversity_fraction: float
    n_features: int
    ev_drivers: list[dict[str, float]] = dataclasses.field(default_factory=list)  # metrics.ev_drivers
    connectivity_tokens: int | None = None  # set when connectivity came from a sample
    l0_per_member: list[float] | None = None  # ensembles: l0 and dead fraction of each member / stage
    dead_fraction_per_member: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def prefix_connectivity(ens: Ensemble, x_BD: np.ndarray, js: list[int]) -> list[float]:
    """Connectivity 1 - nnz(Z^T Z)/F^2 of the first j members, for each j in js, from ONE co-firing
    matrix: member j's codes do not depend on later members (bagging) or stages (boosting), so the
    j-prefix's firing matrix is the first j*m columns of the full one."""
    sub = ensemble.prefix(ens, max(js)) if ens.n_members > 1 else ens

    @jax.jit
    def cofire(x_BD):
        return metrics.cofiring(ensemble.encode(sub, x_BD))

    C_FF = np.asarray(cofire(jnp.asarray(x_BD, jnp.float32)))
    m = ens.cfg.width
    return [1.0 - float(C_FF[: j * m, : j * m].sum()) / float((j * m) ** 2) for j in js]


def run(ens: Ensemble, acts, cfg: IntrinsicConfig = IntrinsicConfig()) -> IntrinsicResult:
    """Every activation metric in one pass over the kept rows of `cfg.split` of `acts`, plus the
    decoder's diversity."""
    if acts.d_in != ens.cfg.d_in:
        raise SaeensError(f"the run expects d_in={ens.cfg.d_in} but the activations have d_in={acts.d_in}: use the run's cache")
    acts = kept_view(acts)  # flagged massive-activation rows are not scored (data/outliers.py)
    n_rows = acts.n_rows(cfg.split)
    if n_rows == 0:
        raise SaeensError(f"the activation cache has no {cfg.split!r} rows: pass --split train or rebuild the cache")
    stream_cofire = cfg.connectivity and cfg.connectivity_tokens is None and ens.width <= cfg.max_cofire
    out = metrics.evaluate_stream(partial(ensemble.forward, ens), acts.chunks(cfg.split), ens.width,
                                  cofire=stream_cofire, progress=cfg.progress, n_tokens=n_rows, members=ens.n_members)
    sampled = None
    if cfg.connectivity and cfg.connectivity_tokens is not None:
        sampled = min(cfg.connectivity_tokens, n_rows)
        out["connectivity"] = prefix_connectivity(ens, acts.gather(np.arange(sampled), cfg.split), [ens.n_members])[0]
    diversity = int(metrics.diversity(ensemble.decoder(ens)))
    return IntrinsicResult(**out, diversity=diversity, diversity_fraction=diversity / ens.width,
                           n_features=ens.width, connectivity_tokens=sampled)


def evaluate_ensemble(ens: Ensemble, acts, split: str = "test", progress: bool = False) -> dict[str, Any]:
    """`run` with the defaults of `saeens evaluate`, as a dict."""
    return run(ens, acts, IntrinsicConfig(split=split, progress=progress)).to_dict()


def is_sweep(run_dir: str | Path) -> bool:
    """Whether run_dir holds a finished sweep (method sweep in its ensemble.json)."""
    from saeens.runs import ENSEMBLE_META

    meta = Path(run_dir) / ENSEMBLE_META
    return meta.is_file() and read_json(meta, "ensemble metadata", "retrain it into a new --out").get("method") == "sweep"


def evaluate_sweep(
    run_dir: str | Path, acts, split: str = "test", progress: bool = False, truth_FD: np.ndarray | None = None
) -> list[dict[str, Any]]:
    """`saeens evaluate` of a sweep run: one row per member in member order, each evaluated as the
    separate SAE it is (never as one ensemble), with the swept settings its architecture uses and,
    given the true features of a synthetic cache, their recovery."""
    from saeens.config import RunConfig
    from saeens.runs import CONFIG
    from saeens.synthetic import feature_recovery
    from saeens.train import load_ensemble

    ens, _ = load_ensemble(run_dir)
    run = RunConfig.load(Path(run_dir) / CONFIG)
    settings = run.sweep.settings(run.sae, run.train)
    used = [name for name, archs in SWEPT.items() if archs is None or ens.cfg.arch in archs]
    rows = []
    for j in range(ens.n_members):
        row = {"member": j, **{n: settings[j][n] for n in used},
               **evaluate_ensemble(ensemble.single(ens.cfg, ensemble.member(ens, j)), acts, split, progress)}
        if truth_FD is not None:
            row["feature_recovery"] = feature_recovery(truth_FD, np.asarray(ens.params["W_dec"][j]))
        rows.append(row)
    return rows


def evaluate_run(run_dir: str | Path, acts, split: str = "test", progress: bool = False) -> dict[str, Any]:
    """`saeens evaluate RUN`: the finished run's method, members and architecture, and its metrics."""
    from saeens.train import load_ensemble

    ens, meta = load_ensemble(run_dir)
    return {"method": meta["method"], "members": meta["members"], "arch": ens.cfg.arch,
            **evaluate_ensemble(ens, acts, split, progress)}
