"""Boosting: stage j trains on the residual that the frozen stages before it leave.

All J stages live stacked on a leading axis in ONE train state. The stage being trained is data
(`state.step // steps_per_stage`), not a Python constant, so one compiled step serves every stage:
the residual of the earlier stages is a `lax.scan` over the stacked stages in which stage l acts
only when l < j (lax.cond, so later stages cost nothing), and the update writes stage j back in
place. Each stage gets the full token budget; its b_dec starts at the geometric median of ITS
residual, and its AuxK loss targets its residual (the stage's own input), unlike the public
code's quirks. Inference over all stages is `ensemble.stage_outputs`, the same scan unmasked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from saeens import ensemble, sae
from saeens.config import SAEConfig, TrainConfig
from saeens.optim import make_optimizer
from saeens.train import Method, TrainState, norm_scale, update


def _take(tree, j):
    return jax.tree.map(lambda a: a[j], tree)


def _put(tree, j, sub):
    return jax.tree.map(lambda a, b: a.at[j].set(b), tree, sub)


def residual_before(params_J: sae.Params, cfg: SAEConfig, x_BD: jax.Array, stage: jax.Array) -> jax.Array:
    """x minus the reconstructions of stages 0..stage-1, each applied to its own residual."""
    J = params_J["W_dec"].shape[0]

    def body(r_BD, inputs):
        l, p = inputs
        r_BD = jax.lax.cond(l < stage, lambda r: r - sae.forward(p, cfg, r)[0], lambda r: r, r_BD)
        return r_BD, None

    r_BD, _ = jax.lax.scan(body, x_BD, (jnp.arange(J), params_J))
    return jax.lax.stop_gradient(r_BD)


def init_stages(key: jax.Array, cfg: SAEConfig, tcfg: TrainConfig, sample_ND: jax.Array, stages: int, opt) -> TrainState:
    """Stacked stage params and optimizer states; one shared input scale; step 0."""
    scale = norm_scale(sample_ND) if tcfg.normalize_activations else jnp.float32(1.0)
    params_J = jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(key, stages))
    return TrainState(
        params_J, jax.vmap(opt.init)(params_J), jnp.zeros((stages, cfg.width), jnp.int32), scale, jnp.int32(0)
    )


def start_stage(state: TrainState, sample_ND: jax.Array, cfg: SAEConfig, steps_per_stage: int) -> TrainState:
    """Before stage j's first step: b_dec at the geometric median of stage j's residual."""
    j = state.step // steps_per_stage
    r_ND = residual_before(state.params, cfg, sample_ND * state.scale, j)
    params = dict(state.params)
    params["b_dec"] = params["b_dec"].at[j].set(sae.geometric_median(r_ND))
    return state._replace(params=params, since_fired=state.since_fired.at[j].set(0))


def make_boosting_step(cfg: SAEConfig, opt, steps_per_stage: int):
    def step(state: TrainState, x_BD: jax.Array, key: jax.Array):
        del key  # the contract's key; the losses are deterministic
        j = state.step // steps_per_stage
        r_BD = residual_before(state.params, cfg, x_BD * state.scale, j)
        p, o, since, metrics = update(
            _take(state.params, j), _take(state.opt_state, j), state.since_fired[j], r_BD, cfg, opt
        )
        new = TrainState(
            _put(state.params, j, p), _put(state.opt_state, j, o), state.since_fired.at[j].set(since),
            state.scale, state.step + 1,
        )
        return new, {**metrics, "stage": j}

    return step


def boosting_method(cfg: SAEConfig, tcfg: TrainConfig, stages: int) -> Method:
    opt = make_optimizer(tcfg)
    S = tcfg.n_steps
    start = jax.jit(lambda state, sample: start_stage(state, sample, cfg, S), donate_argnums=0)

    def prepare(state: TrainState, step: int, sample_ND: jax.Array) -> TrainState:
        return start(state, sample_ND) if step % S == 0 else state

    return Method(
        init=lambda key, sample: init_stages(key, cfg, tcfg, sample, stages, opt),
        step=jax.jit(make_boosting_step(cfg, opt, S), donate_argnums=0),
        n_steps=stages * S,
        to_ensemble=lambda s: ensemble.boosting(cfg, jax.vmap(lambda p: sae.fold_scale(p, cfg, s.scale))(s.params)),
        prepare=prepare,
    )
