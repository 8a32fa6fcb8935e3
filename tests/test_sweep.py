"""Sweeps: each member of one compiled sweep equals the single run with its settings; the CLI
trains the grid, evaluates and exports it member by member; bad grids are refused in one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from saeens import train
from saeens.cli import main
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, SweepConfig, TrainConfig
from saeens.data.cache import batch_indices
from saeens.io.saelens import load_saelens
from saeens.optim import make_optimizer
from saeens.synthetic import make_synthetic
from saeens.train import sweep

STEPS, BATCH = 8, 128


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(4000, 16, 48, active=3, seed=0)


@pytest.mark.parametrize(
    "arch,grid,member_batch",
    [
        ("relu", {"lr": (1e-3, 3e-3), "l1_coeff": (0.5, 2.0)}, None),
        ("jumprelu", {"lr": (1e-3, 3e-3), "l0_coeff": (0.1, 1.0), "jumprelu_bandwidth": (0.01, 0.1)}, None),
        ("topk", {"lr": (1e-3, 3e-3)}, 1),  # the sparse kernel; dead latents after a step, so AuxK acts
    ],
)
def test_each_member_equals_the_single_run_with_its_settings(syn, arch, grid, member_batch):
    """Same seed -> the same init key (a single run's) and batches for every member: member j of
    the sweep must be the single run with member j's lr and coefficients, to float rounding.
    member_batch None: one vmap over the members; 1: the loop a one-device CPU uses."""
    cfg = SAEConfig(d_in=16, width=64, arch=arch, k=4, dead_tokens=BATCH)
    tcfg = TrainConfig(n_tokens=STEPS * BATCH, batch_size=BATCH)
    settings = SweepConfig(**grid).settings(cfg, tcfg)
    sample, key = jnp.asarray(syn.acts_ND[:512]), jax.random.key(3)
    batches = [syn.acts_ND[batch_indices(4000, BATCH, 0, s)] for s in range(STEPS)]
    state = sweep.init_sweep(key, cfg, tcfg, sample, settings)
    step = jax.jit(sweep.make_sweep_step(cfg, tcfg, member_batch))
    for s, x in enumerate(batches):
        state, _ = step(state, x, jax.random.key(s))
    flat_J = np.concatenate([np.asarray(a).reshape(len(settings), -1) for a in jax.tree.leaves(state.params)], axis=1)
    assert len(np.unique(flat_J, axis=0)) == len(settings), "two settings trained the same member"
    for j, point in enumerate(settings):
        cfg_j = cfg.replace(**{n: v for n, v in point.items() if n != "lr"})
        tcfg_j = TrainConfig(n_tokens=STEPS * BATCH, batch_size=BATCH, lr=point["lr"])
        opt = make_optimizer(tcfg_j)
        one, single_step = train.init_state(key, cfg_j, tcfg_j, sample, opt), jax.jit(train.make_step(cfg_j, opt))
        for s, x in enumerate(batches):
            one, _ = single_step(one, x, jax.random.key(s))
        np.testing.assert_array_equal(state.since_fired[j], one.since_fired, err_msg=f"{arch} member {j}")
        for name, leaf in one.params.items():
            # a traced lr and vmapped matmuls round differently from a constant one: ~1e-7 measured
            np.testing.assert_allclose(state.params[name][j], leaf, rtol=1e-5, atol=1e-6, err_msg=f"{arch} {name} member {j}")
        assert float(state.hparams["lr"][j]) == pytest.approx(point["lr"])


def test_grid_order_and_config_round_trip():
    run = RunConfig(SAEConfig(16, 32, "relu"), TrainConfig(n_tokens=1280, batch_size=128), EnsembleConfig("sweep", 6),
                    SweepConfig(lr=[1e-4, 3e-4, 1e-3], l1_coeff=[1, 2]))
    points = [(p["lr"], p["l1_coeff"]) for p in run.sweep.settings(run.sae, run.train)]
    assert points == [(1e-4, 1.0), (1e-4, 2.0), (3e-4, 1.0), (3e-4, 2.0), (1e-3, 1.0), (1e-3, 2.0)]  # last fastest
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    plain = RunConfig(run.sae, run.train, EnsembleConfig("bagging", 2))
    assert "sweep" not in plain.to_dict()  # other runs' config.json are unchanged


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "acts"
    assert main(["synthetic", "--out", str(out), "--d-in", "16", "--features", "32", "--tokens", "3000", "--active", "3"]) == 0
    return out


COMMON = ["--arch", "relu", "--width", "32", "--tokens", "1280", "--batch-size", "128", "--quiet"]


def test_cli_sweep_trains_evaluates_and_exports_each_member(acts, tmp_path, capsys):
    sw, one = tmp_path / "sweep", tmp_path / "single"
    assert main(["train", "--activations", str(acts), "--out", str(sw), "--method", "sweep",
                 "--lr", "1e-3,3e-3", "--l1", "0.5,2", *COMMON]) == 0
    assert main(["train", "--activations", str(acts), "--out", str(one), "--lr", "3e-3", "--l1", "0.5", *COMMON]) == 0
    meta = json.loads((sw / "ensemble.json").read_text())
    assert (meta["method"], meta["members"]) == ("sweep", 4)
    swept, single = load_file(str(sw / "ensemble.safetensors")), load_file(str(one / "ensemble.safetensors"))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):  # member 2 = (lr 3e-3, l1 0.5)
        np.testing.assert_allclose(swept[name][2], single[name][0], rtol=1e-5, atol=1e-6, err_msg=name)

    capsys.readouterr()
    out_json, one_json = tmp_path / "sweep.json", tmp_path / "one.json"
    assert main(["evaluate", str(sw), "--activations", str(acts), "--json", str(out_json), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert main(["evaluate", str(one), "--activations", str(acts), "--json", str(one_json), "--quiet"]) == 0
    rows = json.loads(out_json.read_text())["members"]
    assert [(r["member"], r["lr"], r["l1_coeff"]) for r in rows] == [(0, 1e-3, 0.5), (1, 1e-3, 2.0), (2, 3e-3, 0.5), (3, 3e-3, 2.0)]
    assert "l0_coeff" not in rows[0] and len([ln for ln in table.splitlines() if str(sw) in ln]) == 4
    ref = json.loads(one_json.read_text())
    for key in ("mse", "l0", "explained_variance", "feature_recovery"):
        assert rows[2][key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert rows[0]["l0"] != pytest.approx(rows[1]["l0"])  # the L1 coefficient mattered

    assert main(["export", str(sw), "--out", str(tmp_path / "export")]) == 0
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["member_dirs"] == [f"member_{j}" for j in range(4)] and manifest["single_equivalent"] is None
    cfg, params = load_saelens(tmp_path / "export" / "member_2")
    np.testing.assert_allclose(params["W_dec"], single["W_dec"][0], rtol=1e-5, atol=1e-6)


def _fails(capsys, argv, *words):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saeens: error:"), err
    for w in words:
        assert w in err[0], err[0]


@pytest.mark.parametrize(
    "flags,words",
    [
        (["--lr", "1e-3,3e-3"], ["--method sweep"]),  # a list without a sweep
        (["--method", "sweep", "--lr", "1e-3,3e-3", "--members", "3"], ["2 points", "drop --members"]),
        (["--method", "sweep", "--lr", "1e-3,-1"], ["learning rate must be > 0"]),
        (["--method", "sweep", "--l0", "1,2"], ["--l0 applies to jumprelu, not to relu"]),
    ],
)
def test_bad_sweeps_are_refused_in_one_line(acts, tmp_path, capsys, flags, words):
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), *COMMON, *flags], *words)
    assert not (tmp_path / "r").exists()


def test_a_config_file_sweeps_a_coefficient_the_architecture_does_not_use_is_refused(acts, tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"ensemble": {"method": "sweep"}, "sweep": {"l0_coeff": [0.1, 1]}}))
    _fails(capsys, ["train", "--activations", str(acts), "--out", str(tmp_path / "r"), "--config", str(cfg), *COMMON],
           "sweeping l0_coeff applies to jumprelu, not to relu")


def test_sweep_on_a_device_mesh_equals_unsharded_and_resumes_exactly(syn, tmp_path):
    """Members (and their settings) split over the mesh's ensemble axis, the batch over data; an
    interrupted sweep resumed on the mesh ends where the uninterrupted unsharded one does."""
    from saeens import sharding
    from saeens.data.cache import ArrayActivations

    run = RunConfig(SAEConfig(16, 32, "relu"), TrainConfig(n_tokens=10 * BATCH, batch_size=BATCH, lr=3e-3, checkpoint_every=4),
                    EnsembleConfig("sweep", 4), SweepConfig(lr=[1e-3, 3e-3], l1_coeff=[0.5, 2.0]))
    acts = ArrayActivations(syn.acts_ND)
    plain = train.fit(tmp_path / "plain", run, acts, progress=False)
    mesh = sharding.make_mesh(2, 2, jax.devices()[:4])
    train.fit(tmp_path / "mesh", run, acts, progress=False, mesh=mesh, stop_after=5)
    meshed = train.fit(tmp_path / "mesh", run, acts, progress=False, mesh=mesh)
    for name, leaf in plain.params.items():
        np.testing.assert_allclose(np.asarray(meshed.params[name]), np.asarray(leaf), rtol=1e-5, atol=1e-6, err_msg=name)
