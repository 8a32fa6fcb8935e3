"""Sharded training on 8 simulated CPU devices (tests/conftest.py) equals unsharded training.

Meshes (ensemble, data) = (4,2), (2,4), (1,8), (8,1) for J=4: members over "ensemble" (or, for
(8,1), each member's latents), batch rows over "data". A checkpoint saved on one mesh restores onto
another and training ends where an uninterrupted unsharded run ends.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from saeens import sharding as shd
from saeens import train
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import ArrayActivations, batch_indices
from saeens.errors import SaeensError
from saeens.synthetic import make_synthetic

MESHES = [(4, 2), (2, 4), (1, 8), (8, 1)]
B = 64
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def eight_devices():
    """Without the 8 simulated devices these tests would test nothing: fail, never skip."""
    if jax.device_count() < 8:
        pytest.fail(f"needs 8 (simulated) devices, found {jax.device_count()}: run under tests/conftest.py's XLA_FLAGS")


@pytest.fixture(scope="module")
def acts():
    return ArrayActivations(make_synthetic(3000, 16, 48, active=3, seed=0).acts_ND)


def _run(method, J=4, steps=6, arch="topk", checkpoint_every=3):
    return RunConfig(
        SAEConfig(d_in=16, width=32, arch=arch, k=4, dead_tokens=300),
        TrainConfig(n_tokens=B * steps, batch_size=B, lr=3e-3, checkpoint_every=checkpoint_every,
                    geometric_median_samples=512, log_every=1000),
        EnsembleConfig(method, J),
    )


@pytest.fixture(scope="module")
def reference(acts, tmp_path_factory):
    """Unsharded runs (everything on one device), computed once."""
    cache = {}

    def get(run):
        if run not in cache:
            cache[run] = train.fit(tmp_path_factory.mktemp("ref"), run, acts, progress=False)
        return cache[run]

    return get


def _assert_same(ens, ref):
    assert ens.params.keys() == ref.params.keys()
    for name in ref.params:
        np.testing.assert_allclose(np.asarray(ens.params[name]), np.asarray(ref.params[name]), err_msg=name, **TOL)
    np.testing.assert_allclose(np.asarray(ens.weights), np.asarray(ref.weights), **TOL)


def _expected_spec(path, leaf, mesh, stacked: bool) -> P:
    """The layout rule of saeens/sharding.py, written out independently."""
    keys = jax.tree_util.keystr(path)
    E = mesh.shape["ensemble"]
    if keys in (".step", ".scale") or leaf.ndim == 0:
        return P()
    lead = [None] if stacked else []
    if stacked and leaf.shape[0] % E == 0:
        return P("ensemble")
    if keys == ".since_fired":
        return P(*lead, "ensemble")
    for name, spec in {"W_enc": (None, "ensemble"), "W_dec": ("ensemble", None), "b_enc": ("ensemble",)}.items():
        if keys.endswith(f"['{name}']"):
            return P(*lead, *spec)
    return P()  # b_dec, Adam counts when latents are split


def _check_layout(state, mesh, stacked):
    n_sharded = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        want = NamedSharding(mesh, _expected_spec(path, leaf, mesh, stacked))
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (jax.tree_util.keystr(path), leaf.sharding, want)
        assert len(leaf.sharding.device_set) == 8
        n_sharded += want.spec != P()
    assert n_sharded >= 6  # params, both Adam moments, dead counters are really split


def test_make_mesh_axes_and_errors():
    mesh = shd.make_mesh(4, 2)
    assert mesh.axis_names == ("ensemble", "data")
    assert dict(mesh.shape) == {"ensemble": 4, "data": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    sub = shd.make_mesh(2, 1, devices=jax.devices()[6:])
    assert [d.id for d in sub.devices.flat] == [d.id for d in jax.devices()[6:]]
    assert [dict(shd.default_mesh(J).shape)["ensemble"] for J in (1, 3, 4, 8, 16)] == [1, 1, 4, 8, 8]
    with pytest.raises(SaeensError, match="needs 6 devices"):
        shd.make_mesh(3, 2)
    with pytest.raises(SaeensError, match="batch size 60 does not split"):
        shd.place_batch(np.zeros((60, 16), np.float32), shd.make_mesh(1, 8))


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bagging_on_mesh_equals_unsharded(acts, reference, tmp_path, shape):
    run = _run("bagging")  # checkpoints every 3 of 6 steps: sharded saves are exercised too
    mesh = shd.make_mesh(*shape)
    _assert_same(train.fit(tmp_path, run, acts, progress=False, mesh=mesh), reference(run))
    # the state fit trained really lives on the mesh with the documented layout, step after step
    method = shd.shard_method(train.build_method(run), mesh, True)  # the same cached method fit used
    sample = jnp.asarray(train.init_sample(acts, run.train))
    state = method.init(jax.random.key(0), sample)
    _check_layout(state, mesh, stacked=True)
    for step in range(2):
        x = shd.gather_batch(acts, batch_indices(acts.n_rows(), B, 0, step), mesh)
        assert x.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), 2)
        state, metrics = method.step(state, x, jax.random.key(step))
    _check_layout(state, mesh, stacked=True)
    assert all(m.sharding.is_fully_replicated for m in jax.tree.leaves(metrics))


@pytest.mark.parametrize("shape", [(2, 4), (8, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_boosting_on_mesh_equals_unsharded(acts, reference, tmp_path, shape):
    run = _run("boosting", steps=3)  # 4 stages x 3 steps, stage starts re-placed by prepare
    _assert_same(train.fit(tmp_path, run, acts, progress=False, mesh=shd.make_mesh(*shape)), reference(run))


def test_expanded_sae_latents_split_over_ensemble(acts, reference, tmp_path):
    run = _run("expanded", steps=4)
    mesh = shd.make_mesh(4, 2)
    _assert_same(train.fit(tmp_path, run, acts, progress=False, mesh=mesh), reference(run))
    state = shd.shard_method(train.build_method(run), mesh, False).init(
        jax.random.key(0), jnp.asarray(train.init_sample(acts, run.train)))
    _check_layout(state, mesh, stacked=False)
    assert state.params["W_enc"].addressable_shards[0].data.shape == (16, 32 * 4 // 4)


def test_checkpoint_restores_onto_another_mesh(acts, reference, tmp_path):
    import orbax.checkpoint as ocp

    run = _run("bagging")  # the config of test_bagging_on_mesh_equals_unsharded: nothing new to compile
    first, second = shd.make_mesh(4, 2), shd.make_mesh(1, 8)
    train.fit(tmp_path, run, acts, progress=False, mesh=first, stop_after=3)  # "interrupted" at step 3
    # the step-3 checkpoint restores onto the other mesh with that mesh's layout
    method = train.build_method(run)
    abstract = jax.eval_shape(method.init, jax.random.key(0), jnp.asarray(train.init_sample(acts, run.train)))
    with ocp.CheckpointManager((tmp_path / "checkpoints").absolute()) as mngr:
        assert mngr.latest_step() == 3
        restored = mngr.restore(3, args=ocp.args.StandardRestore(shd.abstract_state(abstract, second, True)))
    _check_layout(restored, second, stacked=True)
    assert int(restored.step[0]) == 3
    # resuming on the other mesh ends where the uninterrupted unsharded run ends
    ens = train.fit(tmp_path, run, acts, progress=False, mesh=second)
    _assert_same(ens, reference(run))
    assert (tmp_path / "ensemble.safetensors").is_file()


def test_gather_batch_reads_this_process_rows(acts):
    mesh = shd.make_mesh(2, 4)
    idx = batch_indices(acts.n_rows(), B, 3, 7)
    np.testing.assert_array_equal(shd.process_rows(mesh, B), np.arange(B))  # one process holds all rows
    x = shd.gather_batch(acts, idx, mesh)
    np.testing.assert_array_equal(np.asarray(x), acts.gather(idx))
    assert {s.data.shape for s in x.addressable_shards} == {(B // 4, 16)}
    np.testing.assert_array_equal(np.asarray(shd.place_batch(acts.gather(idx), mesh)), np.asarray(x))
