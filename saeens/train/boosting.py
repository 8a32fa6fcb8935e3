"""Boosting: stage j trains on the residual that the frozen stages before it leave.

All J stages live stacked on a leading axis in ONE train state. The stage being trained is data
(`state.step // steps_per_stage`), not a Python constant, so one compiled step serves every stage:
the residual of the earlier stages is a scan of `stage_residual` links with only the stages l < j
active (inference's `ensemble.stage_scan` is the same chain with codes; TopK's links here are the
sparse forward of saeens/kernels.py), and the single-SAE `advance` trains stage j on it and is
written back into the stack. Each stage gets the full token budget; its b_dec starts at the
geometric median of ITS residual, and its AuxK loss targets its residual (the stage's own input),
unlike the public code's quirks.

Where the training rows can be read by index, the residual is not recomputed every step: it is
written once per stage to a residual cache (saeens/train/residual.py), and `make_stage_step` trains
the stage alone (taken out of the stack at its start, written back at checkpoints and at its end),
on the raw batch at stage 0 and the cached residual rows after it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from saeens import ensemble, kernels, sae
from saeens.config import SAEConfig, TrainConfig
from saeens.ensemble import Ensemble
from saeens.train.step import TrainState, advance, input_scale


def stage_state(state: TrainState, j: jax.Array) -> TrainState:
    """Stage j's own single-SAE train state (the shared scale and step as they are)."""
    params, opt_state, since = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, keepdims=False),
                                            (state.params, state.opt_state, state.since_fired))
    return TrainState(params, opt_state, since, state.scale, state.step)


def with_stage(state: TrainState, j: jax.Array, sub: TrainState) -> TrainState:
    """state with stage j replaced by sub (and sub's step), as a dynamic-update-slice into the
    donated stacks (XLA still copies the stacked Adam moments around it: saeens/allocator.py keeps
    those copies from costing page faults every step)."""
    params, opt_state, since = jax.tree.map(lambda a, b: jax.lax.dynamic_update_index_in_dim(a, b, j, 0),
                                            (state.params, state.opt_state, state.since_fired),
                                            (sub.params, sub.opt_state, sub.since_fired))
    return TrainState(params, opt_state, since, state.scale, sub.step)


def residual_before(params_J: sae.Params, cfg: SAEConfig, x_BD: jax.Array, stage: jax.Array) -> jax.Array:
    """x minus the reconstructions of stages 0..stage-1, each applied to its own residual (the
    chain of `ensemble.stage_scan` without its codes: TopK's links are sparse)."""

    def link(r_BD, inputs):
        p, active = inputs
        return jax.lax.cond(active, lambda: stage_residual(p, cfg, r_BD), lambda: r_BD), None

    active_J = jnp.arange(params_J["W_dec"].shape[0]) < stage
    return jax.lax.stop_gradient(jax.lax.scan(link, x_BD, (params_J, active_J))[0])


def init_stages(
    key: jax.Array, cfg: SAEConfig, tcfg: TrainConfig, sample_ND: jax.Array, stages: int,
    opt: optax.GradientTransformation,
) -> TrainState:
    """Stacked stage params and optimizer states; one shared input scale; step 0."""
    params_J = jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(key, stages))
    return TrainState(params_J, jax.vmap(opt.init)(params_J), jnp.zeros((stages, cfg.width), jnp.int32),
                      input_scale(sample_ND, tcfg), jnp.int32(0))


def start_stage(state: TrainState, sample_ND: jax.Array, cfg: SAEConfig, steps_per_stage: int) -> TrainState:
    """Before stage j's first step: b_dec at the geometric median of stage j's residual."""
    j = state.step // steps_per_stage
    r_ND = residual_before(state.params, cfg, sample_ND * state.scale, j)
    params = state.params | {"b_dec": state.params["b_dec"].at[j].set(sae.geometric_median(r_ND))}
    return state._replace(params=params, since_fired=state.since_fired.at[j].set(0))


def stage_residual(params: sae.Params, cfg: SAEConfig, r_BD: jax.Array) -> jax.Array:
    """The residual one stage leaves of its input r (one link of `ensemble.stage_scan`'s chain);
    TopK's through the sparse forward (BatchTopK infers by threshold: dense)."""
    if cfg.arch == "topk":
        return kernels.topk_residual(params, cfg, r_BD)
    return r_BD - sae.forward(params, cfg, r_BD)[0]


def make_boosting_step(cfg: SAEConfig, opt: optax.GradientTransformation, steps_per_stage: int) -> Callable:
    """(stacked state, raw batch, key) -> (stacked state, stage j's metrics + "stage"), j = step // S:
    the step computes stage j's residual through the frozen stages (streams, several hosts). The
    stage index is data, so one program serves every stage."""

    def boosting_step(state: TrainState, x_BD: jax.Array, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        del key  # the contract's key; the losses are deterministic
        j = state.step // steps_per_stage
        sub, metrics = advance(stage_state(state, j), residual_before(state.params, cfg, x_BD * state.scale, j), cfg, opt)
        return with_stage(state, j, sub), {**metrics, "stage": j}

    return boosting_step


def make_stage_step(cfg: SAEConfig, opt: optax.GradientTransformation, steps_per_stage: int) -> Callable:
    """(stage j's own state, batch, key) -> (its state, metrics + "stage"): the residual-cache step
    on the stage alone. The loop takes the stage out of the stack when it starts (`stage_state`) and
    writes it back at checkpoints and at its end (`with_stage`), so no step copies the stacked
    parameters and Adam moments around a write-back (~10% of a step at J = 8). The batch is raw at
    stage 0 and the stage's cached scaled residual after it; the stage index is data (one program)."""

    def stage_step(sub: TrainState, x_BD: jax.Array, key: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        del key
        j = sub.step // steps_per_stage
        sub, metrics = advance(sub, x_BD * jnp.where(j == 0, sub.scale, jnp.ones_like(sub.scale)), cfg, opt)
        return sub, {**metrics, "stage": j}

    return stage_step


def make_prepare(cfg: SAEConfig, steps_per_stage: int) -> Callable:
    """(state, step, sample) -> state: starts a stage at its first step, else leaves the state."""
    start = jax.jit(lambda state, sample: start_stage(state, sample, cfg, steps_per_stage), donate_argnums=0)

    def prepare(state: TrainState, step: int, sample_ND: jax.Array) -> TrainState:
        return start(state, sample_ND) if step % steps_per_stage == 0 else state

    return prepare


def final_ensemble(cfg: SAEConfig, state: TrainState) -> Ensemble:
    """The stages in activation units (each folds the shared input scale), weights 1."""
    return ensemble.boosting(cfg, jax.vmap(lambda p: sae.fold_scale(p, cfg, state.scale))(state.params))
