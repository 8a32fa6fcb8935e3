"""Training checked against independent definitions: boosting's residual chain in NumPy, the
input scale folded back into activation units, BatchTopK's inference threshold, one compiled step
program per method, and bagging's one-device member loop."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import ensemble, sae, train
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import ArrayActivations, batch_indices
from saeens.optim import make_optimizer
from saeens.synthetic import make_synthetic
from saeens.train import boosting, methods
from saeens.train.step import advance

D, B = 16, 128
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def syn():
    return make_synthetic(4000, D, 48, active=3, seed=0)


def _run(method, J=1, arch="topk", steps=4):
    return RunConfig(
        SAEConfig(d_in=D, width=16, arch=arch, k=4, dead_tokens=2000),
        TrainConfig(n_tokens=B * steps, batch_size=B, lr=3e-3, checkpoint_every=0, geometric_median_samples=512),
        EnsembleConfig(method, J),
    )


def _np_topk_forward(p, r_BD, k):
    """One TopK SAE in float64 NumPy: (reconstruction, codes)."""
    p = {n: np.asarray(v, np.float64) for n, v in p.items()}
    pre_BM = (r_BD - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    keep_BM = pre_BM >= np.sort(pre_BM, axis=1)[:, -k][:, None]
    codes_BM = np.where(keep_BM, np.maximum(pre_BM, 0), 0)
    return codes_BM @ p["W_dec"] + p["b_dec"], codes_BM


def _np_residual(params_J, x_BD, j, k):
    """x minus stages 0..j-1, stage l reconstructing the residual that stages < l leave."""
    r_BD = np.asarray(x_BD, np.float64)
    for l in range(j):
        r_BD = r_BD - _np_topk_forward(jax.tree.map(lambda a: a[l], params_J), r_BD, k)[0]
    return r_BD


def test_boosting_trains_every_stage_on_the_numpy_residual(syn):
    J, S = 3, 4
    run = _run("boosting", J, steps=S)
    cfg, opt = run.sae, make_optimizer(run.train)
    method = methods.boosting_method(cfg, run.train, J)
    sample = jnp.asarray(syn.acts_ND[:512])
    state = method.init(jax.random.key(0), sample)
    one_step = jax.jit(lambda sub, r: advance(sub, r, cfg, opt))
    for step in range(J * S):
        state = method.prepare(state, step, sample)
        x_BD = syn.acts_ND[batch_indices(4000, B, 0, step)]
        if step % S == 0:  # stage j starts: its b_dec, its residual and its first step
            j = step // S
            scaled = np.asarray(x_BD) * float(state.scale)
            r_np = _np_residual(state.params, scaled, j, cfg.k)
            r = boosting.residual_before(state.params, cfg, jnp.asarray(scaled, jnp.float32), j)
            np.testing.assert_allclose(r, r_np, rtol=1e-4, atol=1e-4, err_msg=f"stage {j} residual")
            r_sample = _np_residual(state.params, np.asarray(sample) * float(state.scale), j, cfg.k)
            np.testing.assert_allclose(state.params["b_dec"][j], sae.geometric_median(jnp.asarray(r_sample, jnp.float32)),
                                       rtol=1e-4, atol=1e-4, err_msg=f"stage {j} b_dec")
            want, _ = one_step(boosting.stage_state(state, j), r)
            state, m = method.step(state, x_BD, jax.random.key(step))
            assert int(m["stage"]) == j
            for name, leaf in want.params.items():
                np.testing.assert_allclose(state.params[name][j], leaf, rtol=1e-6, atol=1e-7, err_msg=f"stage {j} {name}")
        else:
            state, _ = method.step(state, x_BD, jax.random.key(step))
    # the trained chain, at inference, is the same NumPy chain
    ens = method.to_ensemble(state)
    x = syn.acts_ND[-300:]
    np.testing.assert_allclose(ensemble.reconstruct(ens, jnp.asarray(x)), x - _np_residual(ens.params, x, J, cfg.k),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,J", [("single", 1), ("expanded", 2), ("bagging", 2), ("boosting", 2)])
def test_input_scale_far_from_one_is_folded_back_into_activation_units(syn, tmp_path, method, J):
    """Activations x 50 (as SmolLM2's are): training is the same in normalised units, so the
    saved ensemble reconstructs 50 x exactly as 50 times the unscaled run reconstructs x."""
    run = _run(method, J, arch="relu", steps=6)
    x = syn.acts_ND[-500:]
    train.fit(tmp_path / "x1", run, ArrayActivations(syn.acts_ND), progress=False)
    train.fit(tmp_path / "x50", run, ArrayActivations(syn.acts_ND * 50), progress=False)
    ens1, _ = train.load_ensemble(tmp_path / "x1")
    ens50, _ = train.load_ensemble(tmp_path / "x50")
    x_hat50 = np.asarray(ensemble.reconstruct(ens50, jnp.asarray(x * 50)))
    np.testing.assert_allclose(x_hat50, 50 * np.asarray(ensemble.reconstruct(ens1, jnp.asarray(x))), rtol=2e-3, atol=2e-3 * 50)
    fvu = np.sum((x * 50 - x_hat50) ** 2) / np.sum((x * 50 - (x * 50).mean(0)) ** 2)
    assert fvu < 0.9, fvu  # in activation units the reconstruction explains the data


def test_batchtopk_inference_threshold_is_the_ema_of_the_smallest_kept_code(syn):
    cfg = SAEConfig(d_in=D, width=16, arch="batchtopk", k=4, batchtopk_threshold_decay=0.8)
    tcfg = TrainConfig(n_tokens=B * 6, batch_size=B, lr=3e-3)
    opt = make_optimizer(tcfg)
    state = train.init_state(jax.random.key(0), cfg, tcfg, jnp.asarray(syn.acts_ND[:512]), opt)
    step = jax.jit(train.make_step(cfg, opt))
    want = None
    for s in range(6):
        x_BD = syn.acts_ND[batch_indices(4000, B, 0, s)]
        p = {n: np.asarray(v, np.float64) for n, v in state.params.items()}
        pre = ((x_BD * float(state.scale) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]).ravel()
        kept = np.sort(pre)[-cfg.k * B:]
        min_kept = kept[kept > 0].min()  # the smallest code the batch rule keeps (ReLU'd: > 0)
        want = min_kept if s == 0 else 0.8 * want + 0.2 * min_kept
        state, _ = step(state, x_BD, jax.random.key(s))
        np.testing.assert_allclose(state.params["threshold"], np.full(16, want), rtol=1e-4, err_msg=f"step {s}")


def _python(code: str, devices: int) -> dict:
    """Run code in a fresh interpreter on `devices` CPU devices; it prints one JSON line last."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_one_compiled_step_program_per_method(tmp_path):
    """Methods are cached in-process, so the count needs a fresh interpreter: a boosting run over
    its 3 stages and a bagging run each compile their step exactly once."""
    counts = _python(f"""
        import json, logging, jax
        jax.config.update("jax_log_compiles", True)
        compiled = []

        class Count(logging.Handler):
            def emit(self, record):
                compiled.append(record.getMessage())

        logging.getLogger("jax").addHandler(Count())
        logging.getLogger("jax").setLevel(logging.WARNING)
        from saeens import train
        from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
        from saeens.data.cache import ArrayActivations
        from saeens.synthetic import make_synthetic

        acts = ArrayActivations(make_synthetic(2000, 16, 48, active=3, seed=0).acts_ND)
        counts = {{}}
        for method, J in (("boosting", 3), ("bagging", 2)):
            run = RunConfig(SAEConfig(d_in=16, width=16, k=4), TrainConfig(n_tokens=3 * 128, batch_size=128, checkpoint_every=2),
                            EnsembleConfig(method, J))
            train.fit({str(tmp_path)!r} + "/" + method, run, acts, progress=False)
            step = train.build_method(run, residual_cache=True).step  # the cached Method fit used (rows by index)
            name = getattr(step, "__wrapped__", step).__name__
            counts[method] = sum(m.startswith(f"Compiling jit({{name}})") for m in compiled)
        print(json.dumps(counts))
        """, devices=1)
    assert counts == {"boosting": 1, "bagging": 1}, counts


def test_one_device_cpu_bagging_loops_over_members_and_equals_vmap():
    """The suite runs on 8 simulated devices, where the member loop is never chosen: one device here."""
    result = _python("""
        import json, jax, jax.numpy as jnp, numpy as np
        from saeens.config import SAEConfig, TrainConfig
        from saeens.optim import make_optimizer
        from saeens.synthetic import make_synthetic
        from saeens.train import bagging

        acts = make_synthetic(2000, 16, 48, active=3, seed=0).acts_ND
        cfg, tcfg, J = SAEConfig(d_in=16, width=16, k=4, dead_tokens=256), TrainConfig(n_tokens=1280, batch_size=128, lr=3e-3), 3
        opt = make_optimizer(tcfg)
        init = bagging.init_members(jax.random.key(0), cfg, tcfg, jnp.asarray(acts[:512]), J, opt)
        loop, vmapped = jax.jit(bagging.make_bagging_step(cfg, opt)), jax.jit(bagging.make_bagging_step(cfg, opt, J))
        a = b = init
        for s in range(8):
            x = acts[s * 128:(s + 1) * 128]
            a, _ = loop(a, x, jax.random.key(s))
            b, _ = vmapped(b, x, jax.random.key(s))
        diff = max(float(jnp.max(jnp.abs(a.params[n] - b.params[n]))) for n in a.params)
        print(json.dumps({"devices": jax.device_count(), "loop": bagging.sequential_members(cfg), "diff": diff}))
        """, devices=1)
    assert result["devices"] == 1 and result["loop"] is True, result
    assert result["diff"] < 1e-5, result
