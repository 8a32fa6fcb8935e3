"""Trainers: bagging == separate trainings, boosting stages, unit norm, resume, the run directory."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import bagging, ensemble, sae, sharding, train
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import ArrayActivations, batch_indices
from saeens.errors import SaeensError
from saeens.optim import make_optimizer
from saeens.synthetic import feature_recovery, make_synthetic
from saeens.train import methods

ARCHS = ["topk", "relu", "jumprelu", "batchtopk"]
DEAD_TOKENS = 128  # one batch: with width 128, TopK/BatchTopK latents die within a few steps and AuxK acts
AUXK = ("topk", "batchtopk")  # ReLU/JumpReLU fire densely this early; their dead counters are still compared


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(8000, 16, 48, active=3, seed=0)


def _run(method, J=1, arch="topk", width=32, n_tokens=128 * 40, **train_kw):
    train_kw = {"batch_size": 128, "lr": 3e-3, "checkpoint_every": 0, **train_kw}
    return RunConfig(
        SAEConfig(d_in=16, width=width, arch=arch, k=4, dead_tokens=DEAD_TOKENS, l1_coeff=1.0),
        TrainConfig(n_tokens=n_tokens, **train_kw),
        EnsembleConfig(method, J),
    )


@pytest.mark.parametrize("arch,member_batch", [(a, None) for a in ARCHS] + [("topk", 1), ("batchtopk", 2)])
def test_bagging_vmap_equals_separate_trainings(syn, arch, member_batch):
    """member_batch None: one vmap over all members; 1: a loop in the step; 2: vmapped chunks.
    Long enough for latents to die, so the dead-latent counters and AuxK are compared too."""
    J, steps = 3, 12
    run = _run("bagging", J, arch, width=128)
    cfg, tcfg = run.sae, run.train
    opt = make_optimizer(tcfg)
    sample = jnp.asarray(syn.acts_ND[:512])
    key = jax.random.key(7)
    stacked = bagging.init_members(key, cfg, tcfg, sample, J, opt)
    bag_step = jax.jit(bagging.make_bagging_step(cfg, opt, member_batch))
    batches = [syn.acts_ND[batch_indices(8000, 128, 0, s)] for s in range(steps)]
    for s, x in enumerate(batches):
        stacked, m = bag_step(stacked, x, jax.random.fold_in(key, s))
    if arch in AUXK:
        assert float(jnp.min(m["dead_fraction"])) > 0 and float(jnp.min(m["sparsity_loss"])) > 0, "no dead latents for AuxK"
    single_step = jax.jit(train.make_step(cfg, opt))
    for j, k in enumerate(bagging.member_keys(key, J)):
        state = train.init_state(k, cfg, tcfg, sample, opt)
        for s, x in enumerate(batches):
            state, _ = single_step(state, x, jax.random.fold_in(key, s))
        np.testing.assert_array_equal(stacked.since_fired[j], state.since_fired, err_msg=f"{arch} member {j}")
        for name, leaf in state.params.items():
            # vmap sums in another order; Adam (beta1 = 0) turns that into ~1e-5 on rarely-updated AuxK latents
            np.testing.assert_allclose(stacked.params[name][j], leaf, rtol=1e-3, atol=1e-4, err_msg=f"{arch} {name} member {j}")


def test_boosting_residual_shrinks_stage_by_stage(syn, tmp_path):
    acts = ArrayActivations(syn.acts_ND, 0.2)
    ens = train.fit(tmp_path, _run("boosting", 4, width=16), acts, progress=False)
    x = jnp.asarray(syn.acts_ND[-1000:])
    norms = [float(jnp.mean(jnp.sum(x**2, -1)))]
    for j in range(1, 5):
        _, r = ensemble.stage_outputs(ensemble.prefix(ens, j), x)
        norms.append(float(jnp.mean(jnp.sum(r**2, -1))))
    assert all(a > b for a, b in zip(norms, norms[1:])), norms
    # the trained chain equals x - sum of stage reconstructions, each on its own residual
    _, r = ensemble.stage_outputs(ens, x)
    np.testing.assert_allclose(ensemble.reconstruct(ens, x), x - r, rtol=1e-4, atol=1e-4)


def test_boosting_stage_starts_at_residual_median(syn):
    run = _run("boosting", 2, width=16)
    method = methods.boosting_method(run.sae, run.train, 2)
    sample = jnp.asarray(syn.acts_ND[:512])
    state = method.init(jax.random.key(0), sample)
    state = method.prepare(state, 0, sample)
    for s in range(run.train.n_steps):
        state, m = method.step(state, syn.acts_ND[batch_indices(8000, 128, 0, s)], jax.random.key(s))
        assert int(m["stage"]) == 0
    stage0 = jax.tree.map(lambda a: a[0], state.params)
    state = method.prepare(state, run.train.n_steps, sample)
    r = sample * state.scale - sae.forward(stage0, run.sae, sample * state.scale)[0]
    np.testing.assert_allclose(state.params["b_dec"][1], sae.geometric_median(r), rtol=1e-5, atol=1e-5)
    state, m = method.step(state, syn.acts_ND[:128], jax.random.key(0))
    assert int(m["stage"]) == 1
    np.testing.assert_array_equal(state.params["W_dec"][0], stage0["W_dec"])  # earlier stage frozen


@pytest.mark.parametrize("method,J", [("single", 1), ("expanded", 2), ("bagging", 2), ("boosting", 2)])
def test_decoder_rows_unit_norm_after_training(syn, tmp_path, method, J):
    ens = train.fit(tmp_path, _run(method, J, arch="relu", n_tokens=128 * 10), ArrayActivations(syn.acts_ND), progress=False)
    np.testing.assert_allclose(jnp.linalg.norm(ensemble.decoder(ens), axis=-1), 1.0, atol=1e-5)


def _assert_resume_equals_uninterrupted(tmp_path, run, acts, stop_after, dead_at_cut=True):
    full = train.fit(tmp_path / "full", run, acts, progress=False)
    train.fit(tmp_path / "cut", run, acts, progress=False, stop_after=stop_after)
    assert not (tmp_path / "cut" / "ensemble.json").exists()
    resumed = train.fit(tmp_path / "cut", run, acts, progress=False)
    for name in full.params:
        np.testing.assert_array_equal(resumed.params[name], full.params[name], err_msg=name)
    loaded, meta = train.load_ensemble(tmp_path / "cut")
    assert meta["method"] == run.ensemble.method and meta["seed"] == run.train.seed
    np.testing.assert_array_equal(loaded.params["W_dec"], full.params["W_dec"])
    rows = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    if dead_at_cut and run.sae.arch in AUXK:  # the first resumed step had dead latents and AuxK on
        first = next(r for r in rows if r["step"] == stop_after + 1)
        assert first["dead_fraction"] > 0 and first["sparsity_loss"] > 0, first
    assert rows == [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method,J,arch", [("bagging", 2, a) for a in ARCHS] + [("single", 1, "batchtopk"),
                                                                                 ("boosting", 2, "batchtopk")])
def test_resume_after_interruption_equals_uninterrupted(syn, tmp_path, method, J, arch):
    run = _run(method, J, arch=arch, width=128, n_tokens=128 * 10, checkpoint_every=4, log_every=1)
    _assert_resume_equals_uninterrupted(tmp_path, run, ArrayActivations(syn.acts_ND), 7 if method != "boosting" else 13)


def test_resume_exactly_at_a_boosting_stage_boundary(syn, tmp_path):
    run = _run("boosting", 3, width=128, n_tokens=128 * 5, checkpoint_every=5, log_every=2)  # a checkpoint ends each stage
    _assert_resume_equals_uninterrupted(tmp_path, run, ArrayActivations(syn.acts_ND), 5, dead_at_cut=False)


def test_boosting_logs_one_integer_stage_per_row_and_shows_it(syn, tmp_path, capsys):
    """log_every 3 does not divide the 4 steps of a stage: rows are still cut at every stage end."""
    run = _run("boosting", 3, n_tokens=128 * 4, log_every=3)
    train.fit(tmp_path, run, ArrayActivations(syn.acts_ND), progress=True)
    rows = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["stage"]) for r in rows] == [(3, 0), (4, 0), (6, 1), (8, 1), (9, 2), (12, 2)]
    assert all(isinstance(r["stage"], int) for r in rows)
    err = capsys.readouterr().err
    assert "train stage 1/3" in err and "train stage 3/3" in err


class _FailingActs(ArrayActivations):
    """Rows that go bad after `good` gathers (the init sample is the first)."""

    def __init__(self, acts_ND, good, value):
        super().__init__(acts_ND)
        self.good, self.value, self.calls = good, value, 0

    def gather(self, idx_N, split="train"):
        self.calls += 1
        x = super().gather(idx_N, split)
        return x if self.calls <= self.good else np.full_like(x, self.value)


@pytest.mark.parametrize("failure", ["nan rows", "inf loss", "mesh"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(syn, tmp_path, capsys, failure):
    """NaN rows in a batch, a loss that overflows after two steps, a batch that does not split over
    the mesh: no config.json stays behind, and the next attempt starts fresh instead of resuming."""
    run = _run("bagging", 2, n_tokens=128 * 6, checkpoint_every=4, log_every=1)
    out = tmp_path / "run"
    with pytest.raises(SaeensError, match={"nan rows": "NaN/Inf", "inf loss": "loss became", "mesh": "does not split"}[failure]):
        if failure == "mesh":
            train.fit(out, run, ArrayActivations(syn.acts_ND), progress=False, mesh=sharding.make_mesh(1, 3, jax.devices()[:3]))
        else:
            train.fit(out, run, _FailingActs(syn.acts_ND, 3, np.nan if failure == "nan rows" else 1e30), progress=False)
    assert not out.exists()
    capsys.readouterr()
    train.fit(out, run, ArrayActivations(syn.acts_ND), progress=True)
    assert "resuming" not in capsys.readouterr().err
    assert (out / "config.json").is_file() and (out / "ensemble.json").is_file()


def test_run_directory_refuses_another_config_or_source_and_records_the_source(syn, tmp_path):
    run = _run("single", n_tokens=128 * 4, checkpoint_every=2)
    acts = ArrayActivations(syn.acts_ND)
    train.fit(tmp_path, run, acts, progress=False, stop_after=3)
    other_lr = dataclasses.replace(run, train=dataclasses.replace(run.train, lr=1e-3))
    with pytest.raises(SaeensError, match="different config"):
        train.fit(tmp_path, other_lr, acts, progress=False)
    with pytest.raises(SaeensError, match="not on this cache"):
        train.fit(tmp_path, run, ArrayActivations(syn.acts_ND[:5000]), progress=False)
    train.fit(tmp_path, run, acts, progress=False)
    _, meta = train.load_ensemble(tmp_path)
    assert meta["source"]["train_rows"] == 8000 and meta["source"]["d_in"] == 16
    assert (meta["arch"], meta["width"], meta["members"], meta["seed"]) == ("topk", 32, 1, 0)
    with pytest.raises(SaeensError, match="not empty and holds no run"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "notes.txt").write_text("mine")
        train.fit(tmp_path / "other", run, acts, progress=False)


def test_topk_recovers_known_features(tmp_path):
    syn = make_synthetic(30000, 32, 64, active=3, seed=1)
    run = RunConfig(
        SAEConfig(d_in=32, width=64, arch="topk", k=4, dead_tokens=20000),
        TrainConfig(n_tokens=256 * 600, batch_size=256, lr=3e-3, checkpoint_every=0),
        EnsembleConfig("single", 1),
    )
    ens = train.fit(tmp_path, run, ArrayActivations(syn.acts_ND), progress=False)
    assert feature_recovery(syn.features_FD, np.asarray(ensemble.decoder(ens))) > 0.9
