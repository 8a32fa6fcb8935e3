"""Trainers: bagging == separate trainings, boosting shrinks residuals, unit norm, resume, recovery."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import bagging, boosting, ensemble, train
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import ArrayActivations, batch_indices
from saeens.optim import make_optimizer
from saeens.synthetic import feature_recovery, make_synthetic


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(8000, 16, 48, active=3, seed=0)


def _run(method, J=1, arch="topk", width=32, n_tokens=128 * 40, **train_kw):
    train_kw = {"batch_size": 128, "lr": 3e-3, "checkpoint_every": 0, **train_kw}
    return RunConfig(
        SAEConfig(d_in=16, width=width, arch=arch, k=4, dead_tokens=2000),
        TrainConfig(n_tokens=n_tokens, **train_kw),
        EnsembleConfig(method, J),
    )


@pytest.mark.parametrize("arch,member_batch", [("topk", None), ("relu", None), ("jumprelu", None), ("batchtopk", None),
                                               ("topk", 1), ("batchtopk", 2)])
def test_bagging_vmap_equals_separate_trainings(syn, arch, member_batch):
    """member_batch None: one vmap over all members; 1: a loop in the step; 2: vmapped chunks."""
    J, steps = 3, 12
    run = _run("bagging", J, arch)
    cfg, tcfg = run.sae, run.train
    opt = make_optimizer(tcfg)
    sample = jnp.asarray(syn.acts_ND[:512])
    key = jax.random.key(7)
    stacked = bagging.init_members(key, cfg, tcfg, sample, J, opt)
    bag_step = jax.jit(bagging.make_bagging_step(cfg, opt, member_batch))
    batches = [syn.acts_ND[batch_indices(8000, 128, 0, s)] for s in range(steps)]
    for s, x in enumerate(batches):
        stacked, _ = bag_step(stacked, x, jax.random.fold_in(key, s))
    single_step = jax.jit(train.make_step(cfg, opt))
    for j, k in enumerate(bagging.member_keys(key, J)):
        state = train.init_state(k, cfg, tcfg, sample, opt)
        for s, x in enumerate(batches):
            state, _ = single_step(state, x, jax.random.fold_in(key, s))
        for name, leaf in state.params.items():
            np.testing.assert_allclose(stacked.params[name][j], leaf, rtol=2e-5, atol=2e-6, err_msg=f"{arch} {name} member {j}")


def test_boosting_residual_shrinks_stage_by_stage(syn, tmp_path):
    acts = ArrayActivations(syn.acts_ND, 0.2)
    ens = train.fit(tmp_path, _run("boosting", 4, width=16), acts, progress=False)
    x = jnp.asarray(syn.acts_ND[-1000:])
    norms = [float(jnp.mean(jnp.sum(x**2, -1)))]
    for j in range(1, 5):
        sub = ensemble.boosting(ens.cfg, jax.tree.map(lambda a: a[:j], ens.params))
        _, r = ensemble.stage_outputs(sub, x)
        norms.append(float(jnp.mean(jnp.sum(r**2, -1))))
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    # the trained chain equals x - sum of stage reconstructions, each on its own residual
    _, r = ensemble.stage_outputs(ens, x)
    np.testing.assert_allclose(ensemble.reconstruct(ens, x), x - r, rtol=1e-4, atol=1e-4)


def test_boosting_stage_starts_at_residual_median(syn):
    run = _run("boosting", 2, width=16)
    method = boosting.boosting_method(run.sae, run.train, 2)
    sample = jnp.asarray(syn.acts_ND[:512])
    state = method.init(jax.random.key(0), sample)
    state = method.prepare(state, 0, sample)
    for s in range(run.train.n_steps):
        state, m = method.step(state, syn.acts_ND[batch_indices(8000, 128, 0, s)], jax.random.key(s))
        assert int(m["stage"]) == 0
    stage0 = jax.tree.map(lambda a: a[0], state.params)
    state = method.prepare(state, run.train.n_steps, sample)
    from saeens import sae

    r = sample * state.scale - sae.forward(stage0, run.sae, sample * state.scale)[0]
    np.testing.assert_allclose(state.params["b_dec"][1], sae.geometric_median(r), rtol=1e-5, atol=1e-5)
    state, m = method.step(state, syn.acts_ND[:128], jax.random.key(0))
    assert int(m["stage"]) == 1
    np.testing.assert_array_equal(state.params["W_dec"][0], stage0["W_dec"])  # earlier stage frozen


@pytest.mark.parametrize("method,J", [("single", 1), ("expanded", 2), ("bagging", 2), ("boosting", 2)])
def test_decoder_rows_unit_norm_after_training(syn, tmp_path, method, J):
    ens = train.fit(tmp_path, _run(method, J, arch="relu", n_tokens=128 * 10), ArrayActivations(syn.acts_ND), progress=False)
    np.testing.assert_allclose(jnp.linalg.norm(ensemble.decoder(ens), axis=-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("method,J", [("single", 1), ("bagging", 2), ("boosting", 2)])
def test_resume_after_interruption_equals_uninterrupted(syn, tmp_path, method, J):
    acts = ArrayActivations(syn.acts_ND)
    run = _run(method, J, arch="batchtopk", n_tokens=128 * 10, checkpoint_every=4)
    full = train.fit(tmp_path / "full", run, acts, progress=False)
    train.fit(tmp_path / "cut", run, acts, progress=False, stop_after=7 if method != "boosting" else 13)
    assert not (tmp_path / "cut" / "ensemble.json").exists()
    resumed = train.fit(tmp_path / "cut", run, acts, progress=False)
    for name in full.params:
        np.testing.assert_array_equal(resumed.params[name], full.params[name], err_msg=name)
    loaded, meta = train.load_ensemble(tmp_path / "cut")
    assert meta["method"] == method
    np.testing.assert_array_equal(loaded.params["W_dec"], full.params["W_dec"])


def test_topk_recovers_known_features(tmp_path):
    syn = make_synthetic(30000, 32, 64, active=3, seed=1)
    run = RunConfig(
        SAEConfig(d_in=32, width=64, arch="topk", k=4, dead_tokens=20000),
        TrainConfig(n_tokens=256 * 600, batch_size=256, lr=3e-3, checkpoint_every=0),
        EnsembleConfig("single", 1),
    )
    ens = train.fit(tmp_path, run, ArrayActivations(syn.acts_ND), progress=False)
    assert feature_recovery(syn.features_FD, np.asarray(ensemble.decoder(ens))) > 0.9
