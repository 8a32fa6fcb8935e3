"""Batch sources and the prefetch: the cache source hands out the rows of batch_indices, a
prefetched run equals one that reads in the step's turn, bad rows fail at their own step, and an
interrupted consumer leaves no thread behind."""

import threading
import time

import jax
import numpy as np
import pytest

from saeens import sharding, train
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import ActivationCache, ArrayActivations, batch_indices, cache_from_array
from saeens.data.source import BatchSource, CacheSource, as_source
from saeens.errors import SaeensError
from saeens.synthetic import make_synthetic
from saeens.train.prefetch import Prefetch

N, D = 3000, 16


@pytest.fixture(scope="module")
def acts_ND():
    return make_synthetic(N, D, 48, active=3, seed=0).acts_ND


def _run(method="bagging", J=2, steps=8, **train_kw):
    train_kw = {"batch_size": 128, "lr": 3e-3, "checkpoint_every": 4, "log_every": 1, **train_kw}
    return RunConfig(SAEConfig(d_in=D, width=32, k=4, dead_tokens=128), TrainConfig(n_tokens=128 * steps, **train_kw),
                     EnsembleConfig(method, J))


def test_cache_source_hands_out_the_rows_of_batch_indices(acts_ND, tmp_path):
    cache = ActivationCache(cache_from_array(acts_ND, tmp_path / "acts", test_fraction=0.1, shard_rows=1000))
    src = as_source(cache)
    assert isinstance(src, CacheSource) and isinstance(src, BatchSource) and as_source(src) is src
    n = cache.n_rows("train")
    for step in (0, 7, 25):  # 25 crosses into the second epoch
        idx = batch_indices(n, 128, 3, step)
        np.testing.assert_array_equal(src.batch(step, 128, 3), acts_ND[idx])
        np.testing.assert_array_equal(src.batch(step, 128, 3, slice(40, 72)), acts_ND[idx[40:72]])
    rng = np.random.default_rng([3, 1 << 30])
    np.testing.assert_array_equal(src.init_sample(500, 3), acts_ND[np.sort(rng.choice(n, 500, replace=False))])
    d = src.describe()
    assert (d["train_rows"], d["d_in"], d["path"]) == (n, D, str((tmp_path / "acts").absolute()))


def test_nan_rows_are_named_by_shard_and_row(acts_ND, tmp_path):
    bad = acts_ND.copy()
    bad[1234, 5] = np.nan
    out = tmp_path / "acts"
    cache_from_array(acts_ND, out, test_fraction=0.0, shard_rows=1000)
    np.save(out / "acts_00001.npy", bad[1000:2000])  # a shard corrupted after it was written
    src = CacheSource(ActivationCache(out))
    step = next(s for s in range(100) if 1234 in batch_indices(N, 128, 0, s))
    with pytest.raises(SaeensError, match="shard acts_00001.npy row 234 holds NaN/Inf"):
        src.batch(step, 128, 0)


def test_prefetched_training_equals_training_in_the_steps_turn(acts_ND, tmp_path):
    run = _run()
    a = train.fit(tmp_path / "ahead", run, ArrayActivations(acts_ND), progress=False, prefetch=3)
    b = train.fit(tmp_path / "in_turn", run, ArrayActivations(acts_ND), progress=False, prefetch=0)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    assert (tmp_path / "ahead" / "metrics.jsonl").read_text() == (tmp_path / "in_turn" / "metrics.jsonl").read_text()


class _BadAt:
    """A BatchSource (no row access) whose batch `bad` is NaN; counts the batches asked for."""

    def __init__(self, acts_ND, bad):
        self.src, self.bad, self.d_in, self.asked = CacheSource(ArrayActivations(acts_ND)), bad, D, []

    def describe(self):
        return self.src.describe()

    def init_sample(self, n, seed):
        return self.src.init_sample(n, seed)

    def batch(self, step, batch_size, seed, rows=slice(None)):
        self.asked.append(step)
        if step == self.bad:
            raise SaeensError(f"batch {step} holds NaN/Inf activations: recompute the cache")
        return self.src.batch(step, batch_size, seed, rows)


def test_a_bad_batch_fails_at_its_own_step_and_the_checkpoints_before_it_stay(acts_ND, tmp_path):
    """The prefetch reads step 6 while steps 4-5 still train: the error surfaces after step 5, so
    the checkpoint at step 4 is written and a resume with good rows continues from it."""
    run = _run(checkpoint_every=4)
    src = _BadAt(acts_ND, bad=6)
    with pytest.raises(SaeensError, match="batch 6 holds NaN"):
        train.fit(tmp_path, run, src, progress=False, prefetch=3)
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 6 and train.checkpoints.manager(tmp_path).latest_step() == 4
    assert src.asked == list(range(7))  # nothing past the bad step was read
    full = train.fit(tmp_path / "full", run, ArrayActivations(acts_ND), progress=False)
    resumed = train.fit(tmp_path, run, ArrayActivations(acts_ND), progress=False)
    np.testing.assert_array_equal(resumed.params["W_dec"], full.params["W_dec"])


def test_prefetch_runs_ahead_by_at_most_its_depth_and_stops_when_the_consumer_leaves():
    fetched = []

    def fetch(step):
        fetched.append(step)
        return step * 10

    with Prefetch(fetch, range(100), depth=2) as batches:
        assert [batches.get(s) for s in range(3)] == [0, 10, 20]
        time.sleep(0.3)
        assert len(fetched) <= 3 + 2 + 1  # the queue's depth plus the fetch blocked on it
    time.sleep(0.1)
    assert not any(t.name == "saeens-prefetch" for t in threading.enumerate())
    assert len(fetched) < 100


def test_an_interrupt_in_the_step_leaves_no_prefetch_thread(acts_ND, tmp_path):
    """A KeyboardInterrupt raised by the step (as Ctrl-C would) ends fit with no thread left behind."""
    run = _run(steps=50, checkpoint_every=0)
    method = train.build_method(run)
    calls = {"n": 0}

    def interrupting(state, x, key):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(state, x, key)

    real = method.step
    object.__setattr__(method, "step", interrupting)
    try:
        with pytest.raises(KeyboardInterrupt):
            train.fit(tmp_path, run, ArrayActivations(acts_ND), progress=False, prefetch=2)
    finally:
        object.__setattr__(method, "step", real)
    time.sleep(0.2)
    assert not any(t.name == "saeens-prefetch" for t in threading.enumerate())
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing was checkpointed: nothing kept


def test_source_batch_under_a_mesh_asks_for_this_process_blocks(acts_ND):
    """On a (2, 4) mesh each device holds a quarter of the rows; the one process asks for every block."""
    src = CacheSource(ArrayActivations(acts_ND))
    mesh = sharding.make_mesh(2, 4, jax.devices()[:8])
    assert sharding.process_blocks(mesh, 128) == [(0, 32), (32, 64), (64, 96), (96, 128)]
    x = sharding.source_batch(src, 5, 128, 0, mesh)
    np.testing.assert_array_equal(np.asarray(x), acts_ND[batch_indices(N, 128, 0, 5)])
    assert x.sharding == sharding.batch_sharding(mesh)
