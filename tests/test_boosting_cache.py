"""Boosting's residual cache: each stage's residual written once per stage and read by its steps
trains the same stages as the per-step residual, resumes exactly (also after a torn cache or a
cut at a stage boundary), and is removed when the run finishes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import train
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import ArrayActivations, batch_indices
from saeens.data.source import CacheSource, RowSource
from saeens.synthetic import make_synthetic
from saeens.train import boosting, residual

N = 3000


@pytest.fixture(scope="module")
def acts():
    return ArrayActivations(make_synthetic(N, 16, 48, active=3, seed=0).acts_ND)


class _RowsHidden:
    """The same batches without row access (as a stream has none): boosting computes the
    residual in every step, as it did before the residual cache."""

    def __init__(self, source):
        self.source, self.d_in = source, source.d_in

    def describe(self):
        return self.source.describe()

    def init_sample(self, n, seed):
        return self.source.init_sample(n, seed)

    def batch(self, step, batch_size, seed, rows=slice(None)):
        return self.source.batch(step, batch_size, seed, rows)


def _run(arch="topk", kernel="sparse", steps=5, **train_kw):
    train_kw = {"batch_size": 128, "lr": 3e-3, "checkpoint_every": 0, **train_kw}
    return RunConfig(SAEConfig(d_in=16, width=64, arch=arch, k=4, dead_tokens=128, l1_coeff=1.0, kernel=kernel),
                     TrainConfig(n_tokens=128 * steps, **train_kw), EnsembleConfig("boosting", 3))


def _log(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch,kernel", [("topk", "sparse"), ("topk", "dense"), ("batchtopk", "sparse"),
                                         ("relu", "sparse"), ("jumprelu", "sparse")])
def test_residual_cache_trains_the_stages_of_the_per_step_residual(acts, tmp_path, arch, kernel):
    """J=3 (stages 1 and 2 read a cache; stage 2's is built from stage 1's; stage 1's holds every
    row, stage 2's the rows it reads): same stages to float tolerance, same log, no cache left."""
    run = _run(arch, kernel, steps=12, log_every=1)
    assert isinstance(CacheSource(acts), RowSource) and not isinstance(_RowsHidden(CacheSource(acts)), RowSource)
    cached = train.fit(tmp_path / "cached", run, acts, progress=False)
    per_step = train.fit(tmp_path / "per_step", run, _RowsHidden(CacheSource(acts)), progress=False)
    for name in per_step.params:
        np.testing.assert_allclose(cached.params[name], per_step.params[name], rtol=1e-4, atol=2e-5, err_msg=name)
    a, b = _log(tmp_path / "cached"), _log(tmp_path / "per_step")
    assert [r["stage"] for r in a] == [r["stage"] for r in b] == [s // 12 for s in range(36)]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-3)
    assert not (tmp_path / "cached" / residual.DIR).exists()


def test_residual_rows_are_the_frozen_stages_residual(acts, tmp_path):
    """What stage 2 reads for a batch is x * scale through stages 0 and 1 (ensemble.stage_scan)."""
    run = _run(steps=4, checkpoint_every=4)
    train.fit(tmp_path, run, acts, progress=False, stop_after=9)  # mid stage 2: its cache is in place
    method = train.build_method(run, residual_cache=True)
    state = train.checkpoints.restore(train.checkpoints.manager(tmp_path),
                                      jax.eval_shape(method.init, jax.random.key(0), jnp.zeros((8, 16))))
    assert sorted(p.name for p in (tmp_path / residual.DIR).iterdir()) == ["stage_002.json", "stage_002.npy"]
    src = method.stage_source(tmp_path, CacheSource(acts), state, 2)
    x = acts.gather(batch_indices(N, 128, 0, 9))
    want = boosting.residual_before(state.params, run.sae, jnp.asarray(x) * state.scale, 2)
    np.testing.assert_allclose(src.batch(9, 128, 0), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(src.batch(9, 128, 0, slice(32, 96)), src.batch(9, 128, 0)[32:96])


@pytest.mark.parametrize("cut,damage", [(7, None), (12, "truncate"), (12, "delete"), (10, None)])
def test_resume_with_a_residual_cache_equals_uninterrupted(acts, tmp_path, cut, damage):
    """Cut mid stage 1 (its cache kept), mid stage 2 with its cache torn or deleted (rebuilt from
    the raw rows through both frozen stages), and exactly at the stage-2 boundary."""
    run = _run(checkpoint_every=1, log_every=2)
    full = train.fit(tmp_path / "full", run, acts, progress=False)
    train.fit(tmp_path / "cut", run, acts, progress=False, stop_after=cut)
    d = tmp_path / "cut" / residual.DIR
    data = d / f"stage_{cut // 5:03d}.npy"
    if cut % 5:
        assert data.is_file() and data.with_suffix(".json").is_file()
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:1000])
    elif damage == "delete":
        data.unlink()
    resumed = train.fit(tmp_path / "cut", run, acts, progress=False)
    for name in full.params:
        np.testing.assert_array_equal(resumed.params[name], full.params[name], err_msg=name)
    assert _log(tmp_path / "cut") == _log(tmp_path / "full")
    assert not d.exists()


def test_a_stale_residual_cache_is_rebuilt_not_read(acts, tmp_path):
    """A marker whose digest names other frozen stages: the file is rebuilt before stage 2 reads it."""
    run = _run(checkpoint_every=1)
    full = train.fit(tmp_path / "full", run, acts, progress=False)
    train.fit(tmp_path / "cut", run, acts, progress=False, stop_after=12)
    data = tmp_path / "cut" / residual.DIR / "stage_002.npy"
    np.save(data, np.zeros_like(np.load(data)))  # a valid .npy of the right shape, other contents
    marker = data.with_suffix(".json")
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "digest": "0" * 64}))
    resumed = train.fit(tmp_path / "cut", run, acts, progress=False)
    for name in full.params:
        np.testing.assert_array_equal(resumed.params[name], full.params[name], err_msg=name)


def test_stage_rows_are_the_rows_the_remaining_stages_read():
    tcfg = TrainConfig(n_tokens=128 * 5, batch_size=128)
    rows = residual.stage_rows(N, tcfg, 5, 10)
    want = np.unique(np.concatenate([batch_indices(N, 128, 0, s) for s in range(5, 10)]))
    np.testing.assert_array_equal(rows, want)
    assert len(rows) == 640 < N
    np.testing.assert_array_equal(residual.stage_rows(N, tcfg, 5, 40), np.arange(N))  # past an epoch: all rows
