"""Ensembles as values: concatenated codes, Proposition 1 (`to_single`) exactly, boosting chain."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import ensemble, sae
from saeens.config import SAEConfig
from saeens.errors import SaeensError


def _stack(arch, J=3, d=8, m=10):
    cfg = SAEConfig(d_in=d, width=m, arch=arch, k=3)
    params = jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(jax.random.key(0), J))
    rng = np.random.default_rng(0)
    params["b_dec"] = jnp.asarray(rng.normal(0, 0.5, (J, d)), jnp.float32)
    params["b_enc"] = jnp.asarray(rng.normal(0, 0.1, (J, m)), jnp.float32)
    if arch == "jumprelu":
        params["log_threshold"] = jnp.log(jnp.asarray(rng.uniform(0.05, 0.3, (J, m)), jnp.float32))
    if arch == "batchtopk":
        params["threshold"] = jnp.asarray(np.repeat(rng.uniform(0.05, 0.3, (J, 1)), m, 1), jnp.float32)
    return cfg, params


X = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "batchtopk"])
def test_bagging_is_mean_of_members(arch):
    cfg, params = _stack(arch)
    ens = ensemble.bagging(cfg, params)
    members = [sae.forward(ensemble.member(ens, j), cfg, X)[0] for j in range(3)]
    np.testing.assert_allclose(ensemble.reconstruct(ens, X), np.mean(members, 0), rtol=1e-5, atol=1e-5)
    codes = ensemble.encode(ens, X)
    assert codes.shape == (20, 30)
    np.testing.assert_allclose(codes[:, 10:20], sae.encode(ensemble.member(ens, 1), cfg, X) / 3, rtol=1e-6)
    np.testing.assert_allclose(ensemble.decoder_bias(ens), np.mean(params["b_dec"], 0), rtol=1e-6)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("weights", [None, [0.5, 0.2, 1.3]])
def test_to_single_reproduces_ensemble_exactly(arch, weights):
    cfg, params = _stack(arch)
    ens = ensemble.bagging(cfg, params)
    if weights is not None:
        ens = ensemble.Ensemble(params, jnp.asarray(weights, jnp.float32), cfg)
    scfg, sp = ensemble.to_single(ens)
    assert scfg.width == 30 and scfg.arch in ("relu", "jumprelu")
    np.testing.assert_allclose(sae.encode(sp, scfg, X), ensemble.encode(ens, X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.forward(sp, scfg, X)[0], ensemble.reconstruct(ens, X), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(sp["W_dec"], axis=1), 1.0, atol=1e-6)


def test_to_single_refuses_topk_and_boosting():
    cfg, params = _stack("topk")
    with pytest.raises(SaeensError, match="TopK"):
        ensemble.to_single(ensemble.bagging(cfg, params))
    cfg, params = _stack("relu")
    with pytest.raises(SaeensError, match="boosting"):
        ensemble.to_single(ensemble.boosting(cfg, params))


def test_boosting_chain_matches_python_loop():
    cfg, params = _stack("topk")
    ens = ensemble.boosting(cfg, params)
    r, total, codes = X.copy(), np.zeros_like(X), []
    for j in range(3):
        x_hat, c = sae.forward(ensemble.member(ens, j), cfg, r)
        total, r, codes = total + x_hat, r - x_hat, codes + [c]
    np.testing.assert_allclose(ensemble.reconstruct(ens, X), total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ensemble.encode(ens, X), np.concatenate(codes, 1), rtol=1e-5, atol=1e-6)


def test_prefix_and_masked_stage_scan():
    """prefix(ens, j): the first j members with the method's weights; a masked stage scan skips the
    inactive stages (zero codes, residual passed on), so it equals the chain of the active prefix."""
    cfg, params = _stack("topk")
    bag, boost = ensemble.bagging(cfg, params), ensemble.boosting(cfg, params)
    sub = ensemble.prefix(bag, 2)
    np.testing.assert_allclose(sub.weights, [0.5, 0.5])
    np.testing.assert_array_equal(sub.params["W_dec"], params["W_dec"][:2])
    assert not sub.sequential and ensemble.prefix(boost, 2).sequential
    np.testing.assert_array_equal(ensemble.prefix(boost, 2).weights, [1.0, 1.0])
    codes_JBM, r_BD = ensemble.stage_scan(params, cfg, jnp.asarray(X), jnp.asarray([True, True, False]))
    want_codes, want_r = ensemble.stage_outputs(ensemble.prefix(boost, 2), jnp.asarray(X))
    np.testing.assert_allclose(r_BD, want_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(codes_JBM[:2], want_codes, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(codes_JBM[2], 0.0)
