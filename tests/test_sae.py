"""One SAE: activations, STE gradients, geometric median, scale folding, loss vs NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import sae
from saeens.config import SAEConfig

ARCHS = ["relu", "topk", "batchtopk", "jumprelu"]


def _params(arch, d=8, m=16, seed=0):
    cfg = SAEConfig(d_in=d, width=m, arch=arch, k=3)
    p = sae.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed)
    p["b_enc"] = jnp.asarray(rng.normal(0, 0.1, m), jnp.float32)
    p["b_dec"] = jnp.asarray(rng.normal(0, 0.1, d), jnp.float32)
    if arch == "jumprelu":
        p["log_threshold"] = jnp.log(jnp.asarray(rng.uniform(0.05, 0.3, m), jnp.float32))
    if arch == "batchtopk":
        p["threshold"] = jnp.full((m,), 0.2, jnp.float32)
    return cfg, p


def _np_codes(arch, p, x, k):
    pre = (x - np.asarray(p["b_dec"])) @ np.asarray(p["W_enc"]) + np.asarray(p["b_enc"])
    if arch == "relu":
        return np.maximum(pre, 0)
    if arch == "topk":
        out = np.zeros_like(pre)
        for i, row in enumerate(pre):
            top = np.argsort(-row)[:k]
            out[i, top] = np.maximum(row[top], 0)
        return out
    if arch == "batchtopk":
        return pre * (pre > np.asarray(p["threshold"]))
    theta = np.exp(np.asarray(p["log_threshold"]))
    r = np.maximum(pre, 0)
    return r * (r > theta)


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_numpy(arch):
    cfg, p = _params(arch)
    x = np.random.default_rng(1).normal(size=(10, 8)).astype(np.float32)
    codes = _np_codes(arch, p, x, cfg.k)
    np.testing.assert_allclose(sae.encode(p, cfg, x), codes, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.decode(p, codes), codes @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"]), rtol=1e-5, atol=1e-5)


def test_batch_topk_keeps_k_times_batch_codes():
    pre = jnp.asarray(np.random.default_rng(0).normal(size=(6, 20)) + 5.0, jnp.float32)  # all positive
    codes = sae.batch_topk_codes(pre, 3)
    assert int(jnp.sum(codes > 0)) == 18
    kept_min = float(jnp.min(jnp.where(codes > 0, pre, jnp.inf)))
    assert kept_min >= float(jnp.max(jnp.where(codes > 0, -jnp.inf, pre)))


def test_jumprelu_straight_through_gradients():
    cfg, p = _params("jumprelu")
    theta = np.exp(np.asarray(p["log_threshold"]))
    z = jnp.asarray(theta[None, :] + np.linspace(-0.002, 0.002, 5)[:, None], jnp.float32)  # near the threshold
    eps = 0.001
    g_theta = jax.grad(lambda t: sae._jumprelu(z, t, eps).sum())(jnp.asarray(theta))
    u = (np.asarray(z) - theta) / eps
    expected = (-(theta / eps) * (np.abs(u) < 0.5)).sum(0)
    np.testing.assert_allclose(g_theta, expected, rtol=1e-4)
    g_step = jax.grad(lambda t: sae._step(z, t, eps).sum())(jnp.asarray(theta))
    np.testing.assert_allclose(g_step, (-(1 / eps) * (np.abs(u) < 0.5)).sum(0), rtol=1e-4)
    g_z = jax.grad(lambda zz: sae._jumprelu(zz, jnp.asarray(theta), eps).sum())(z)
    np.testing.assert_array_equal(g_z, (np.asarray(z) > theta).astype(np.float32))


def test_geometric_median_minimises_summed_distance():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(200, 5)), 50 + rng.normal(size=(20, 5))]).astype(np.float32)
    med = np.asarray(sae.geometric_median(jnp.asarray(x), n_iter=200))
    cost = lambda y: np.linalg.norm(x - y, axis=1).sum()  # noqa: E731
    for _ in range(20):
        assert cost(med) <= cost(med + rng.normal(scale=0.05, size=5)) + 1e-3
    assert np.linalg.norm(med) < np.linalg.norm(x.mean(0))  # robust to the outlier cluster


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_scale_equals_scaled_sae(arch):
    cfg, p = _params(arch)
    x = np.random.default_rng(2).normal(size=(10, 8)).astype(np.float32)
    s = 3.7
    folded = sae.fold_scale(p, cfg, s)
    x_hat, codes = sae.forward(folded, cfg, x)
    x_hat_s, codes_s = sae.forward(p, cfg, s * x)
    np.testing.assert_allclose(x_hat, x_hat_s / s, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(codes, codes_s / s, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_matches_numpy(arch):
    cfg, p = _params(arch)
    x = np.random.default_rng(3).normal(size=(12, 8)).astype(np.float32)
    no_dead = jnp.zeros((cfg.width,), bool)
    loss, aux = sae.loss(p, cfg, x, no_dead)
    train_codes = np.asarray(aux["codes"])
    x_hat = train_codes @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"])
    mse = np.mean(np.sum((x - x_hat) ** 2, axis=1))
    if arch == "relu":
        penalty = cfg.l1_coeff * np.mean(np.sum(np.abs(train_codes) * np.linalg.norm(np.asarray(p["W_dec"]), axis=1), 1))
    elif arch == "jumprelu":
        penalty = cfg.l0_coeff * np.mean(np.sum(train_codes > 0, axis=1))
    else:
        penalty = 0.0
    np.testing.assert_allclose(float(loss), mse + penalty, rtol=1e-5)


def test_relu_loss_gradients_match_numpy():
    """Every parameter's gradient, b_dec's included (it enters the encoder and the decoder)."""
    cfg, p = _params("relu")
    x = np.random.default_rng(5).normal(size=(12, 8)).astype(np.float32)
    grads, _ = jax.grad(sae.loss, has_aux=True)(p, cfg, x, jnp.zeros((cfg.width,), bool))
    W_enc, b_enc, W_dec, b_dec = (np.asarray(p[n], np.float64) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    B = x.shape[0]
    xc = x - b_dec
    pre = xc @ W_enc + b_enc
    codes = np.maximum(pre, 0)
    norms = np.linalg.norm(W_dec, axis=1)
    d_xhat = -2 * (x - codes @ W_dec - b_dec) / B
    d_pre = (d_xhat @ W_dec.T + cfg.l1_coeff * norms / B) * (pre > 0)
    expected = {
        "W_enc": xc.T @ d_pre,
        "b_enc": d_pre.sum(0),
        "W_dec": codes.T @ d_xhat + cfg.l1_coeff / B * codes.sum(0)[:, None] * W_dec / norms[:, None],
        "b_dec": d_xhat.sum(0) - d_pre.sum(0) @ W_enc.T,
    }
    for name, g in expected.items():
        np.testing.assert_allclose(grads[name], g, rtol=1e-4, atol=1e-5, err_msg=name)


def test_auxk_uses_dead_latents_only():
    cfg, p = _params("topk")
    x = np.random.default_rng(4).normal(size=(16, 8)).astype(np.float32)
    dead = jnp.zeros((cfg.width,), bool).at[:5].set(True)
    pre = sae.pre_activations(p, x)
    err = jnp.asarray(x) - sae.decode(p, sae.activate(p, cfg, pre, train=True))
    aux = sae.auxk_loss(pre, err, dead, p["W_dec"], k_aux=2)
    pre_np, err_np = np.asarray(pre), np.asarray(err)
    codes = np.zeros_like(pre_np)
    for i in range(16):
        top = np.argsort(-pre_np[i, :5])[:2]
        codes[i, top] = np.maximum(pre_np[i, top], 0)
    expected = np.sum((codes @ np.asarray(p["W_dec"]) - err_np) ** 2) / 16  # mean over tokens of the summed error
    np.testing.assert_allclose(float(aux), expected, rtol=1e-5)
    assert float(sae.auxk_loss(pre, err, jnp.zeros(16, bool), p["W_dec"], 2)) == 0.0
    grads = jax.grad(lambda q: sae.auxk_loss(sae.pre_activations(q, x), err, dead, q["W_dec"], 2))(p)
    assert np.all(np.asarray(grads["W_dec"])[5:] == 0)  # live latents get no AuxK gradient
