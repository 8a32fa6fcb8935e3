"""Method name -> Method: the functions (and the stage length) that `fit` needs.

  single / expanded   jit(single step)            (expanded = one SAE of J*m latents)
  bagging             jit(vmap(single step))      saeens/train/bagging.py
  boosting            jit(single step on stage `state.step // S`, input = residual of the
                      frozen stages, computed in the step or read from the stage's residual
                      cache; with the cache the stage trains alone between enter and leave)
                                                  saeens/train/boosting.py, residual.py
  sweep               jit(bagging's member map of a step whose lr and coefficients are the
                      member's data)              saeens/train/sweep.py
Each method's init and step are jitted HERE, once (a config compiles one step program, whatever
the stage; an op-by-op init of J members cost ~1 s of dispatches).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from saeens import ensemble, sae
from saeens.config import RunConfig, SAEConfig, SweepConfig, TrainConfig
from saeens.ensemble import Ensemble
from saeens.optim import make_optimizer
from saeens.data.source import BatchSource
from saeens.train import bagging, boosting, residual, sweep
from saeens.train.step import init_state, make_step


@dataclasses.dataclass(frozen=True)
class Method:
    """A training method as the functions `fit` needs and nothing else."""

    init: Callable[[jax.Array, jax.Array], Any]  # (key, sample_ND) -> state
    step: Callable[[Any, jax.Array, jax.Array], tuple[Any, dict]]  # jitted (state, batch, key)
    n_steps: int  # total steps (boosting: stages * steps per stage)
    to_ensemble: Callable[[Any], Ensemble]  # final state -> ensemble in activation units
    prepare: Callable[[Any, int, jax.Array], Any] | None = None  # (state, step, sample) before a step
    steps_per_stage: int | None = None  # boosting: the log and the progress bar follow the stages
    # boosting with a residual cache: (run_dir, source, state, stage) -> the source the stage's steps read
    stage_source: Callable[[Path, BatchSource, Any, int], BatchSource] | None = None
    # boosting with a residual cache: `step` trains the stage alone; enter (state, stage) takes it out of
    # the stacked state, leave (state, stage, stage state) writes it back (donating the stacked state)
    enter: Callable[[Any, jax.Array], Any] | None = None
    leave: Callable[[Any, jax.Array, Any], Any] | None = None


def single_method(cfg: SAEConfig, tcfg: TrainConfig) -> Method:
    opt = make_optimizer(tcfg)
    return Method(
        init=jax.jit(lambda key, sample: init_state(key, cfg, tcfg, sample, opt)),
        step=jax.jit(make_step(cfg, opt), donate_argnums=0),
        n_steps=tcfg.n_steps,
        to_ensemble=lambda s: ensemble.single(cfg, sae.fold_scale(s.params, cfg, s.scale)),
    )


def bagging_method(cfg: SAEConfig, tcfg: TrainConfig, members: int) -> Method:
    opt = make_optimizer(tcfg)
    return Method(
        init=jax.jit(lambda key, sample: bagging.init_members(key, cfg, tcfg, sample, members, opt)),
        step=jax.jit(bagging.make_bagging_step(cfg, opt), donate_argnums=0),
        n_steps=tcfg.n_steps,
        to_ensemble=lambda s: bagging.final_ensemble(cfg, s),
    )


def boosting_method(cfg: SAEConfig, tcfg: TrainConfig, stages: int, residual_cache: bool = False) -> Method:
    """residual_cache: each stage's residual is written once at its start and read by its steps
    (needs rows by index); otherwise every step recomputes it through the frozen stages."""
    opt, S = make_optimizer(tcfg), tcfg.n_steps
    common = dict(init=jax.jit(lambda key, sample: boosting.init_stages(key, cfg, tcfg, sample, stages, opt)),
                  n_steps=stages * S, to_ensemble=lambda s: boosting.final_ensemble(cfg, s),
                  prepare=boosting.make_prepare(cfg, S), steps_per_stage=S)
    if not residual_cache:
        return Method(step=jax.jit(boosting.make_boosting_step(cfg, opt, S), donate_argnums=0), **common)

    def stage_source(run_dir, source, state, stage):
        return residual.stage_source(run_dir, source, state, cfg, tcfg, stage, stages)

    return Method(step=jax.jit(boosting.make_stage_step(cfg, opt, S), donate_argnums=0), stage_source=stage_source,
                  enter=jax.jit(boosting.stage_state), leave=jax.jit(boosting.with_stage, donate_argnums=0), **common)


def sweep_method(cfg: SAEConfig, tcfg: TrainConfig, grid: SweepConfig) -> Method:
    settings = grid.settings(cfg, tcfg)
    return Method(
        init=jax.jit(lambda key, sample: sweep.init_sweep(key, cfg, tcfg, sample, settings)),
        step=jax.jit(sweep.make_sweep_step(cfg, tcfg), donate_argnums=0),
        n_steps=tcfg.n_steps,
        to_ensemble=lambda s: bagging.final_ensemble(cfg, s),
    )


def build_method(run: RunConfig, residual_cache: bool = False) -> Method:
    """single | expanded | bagging | boosting | sweep -> its Method (cached: a config compiles once).
    residual_cache applies to boosting only (see `boosting_method`)."""
    return _build(run, residual_cache and run.ensemble.method == "boosting")


@functools.lru_cache(maxsize=16)
def _build(run: RunConfig, residual_cache: bool) -> Method:
    method, J = run.ensemble.method, run.ensemble.members
    if method == "single":
        return single_method(run.sae, run.train)
    if method == "expanded":
        return single_method(run.sae.replace(width=run.sae.width * J), run.train)
    if method == "bagging":
        return bagging_method(run.sae, run.train, J)
    if method == "sweep":
        return sweep_method(run.sae, run.train, run.sweep)
    return boosting_method(run.sae, run.train, J, residual_cache)
