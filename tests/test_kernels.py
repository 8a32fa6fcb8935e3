"""Sparse TopK/BatchTopK kernel == the dense sae.loss: value, every gradient, under vmap, in training;
the block-pruned top-k selects what lax.top_k selects."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import kernels, sae, topk
from saeens.config import SAEConfig, TrainConfig
from saeens.errors import SaeensError
from saeens.optim import make_optimizer
from saeens.train import bagging, boosting
from saeens.train.step import init_state, make_step

D, M, B = 8, 48, 20


def _setup(arch, seed=0, k=3, aux_k=5, width=M):
    cfg = SAEConfig(d_in=D, width=width, arch=arch, k=k, aux_k=aux_k)
    p = sae.init(jax.random.key(seed), cfg)
    rng = np.random.default_rng(seed)
    p["b_enc"] = jnp.asarray(rng.normal(0, 0.1, width), jnp.float32)
    p["b_dec"] = jnp.asarray(rng.normal(0, 0.1, D), jnp.float32)
    x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    return cfg, p, x


def _dead(n, seed=0, width=M):
    perm = np.random.default_rng(seed + 100).permutation(width)[:n]
    return jnp.zeros((width,), bool).at[perm].set(True)


# small chunks, AuxK blocks and selection blocks: padding, several chunks, several dead blocks and
# the two-stage top-k are exercised
SMALL = dict(chunk=16, aux_block=8, select_block=4)


def _dense(p, cfg, x, dead):
    return jax.value_and_grad(sae.loss, has_aux=True)(p, cfg.replace(kernel="dense"), x, dead)


def _sparse(p, cfg, x, dead):
    spec = kernels.spec_of(cfg, **SMALL)
    return jax.value_and_grad(lambda q: kernels.sparse_loss(q, cfg, x, dead, spec), has_aux=True)(p)


_dense_j = jax.jit(_dense, static_argnums=1)
_sparse_j = jax.jit(_sparse, static_argnums=1)


def _assert_same(dense, sparse, what=""):
    (ld, ad), gd = dense
    (ls, as_), gs = sparse
    np.testing.assert_allclose(ls, ld, rtol=1e-5, err_msg=what)
    np.testing.assert_allclose(as_["mse"], ad["mse"], rtol=1e-5, err_msg=what)
    np.testing.assert_allclose(as_["sparsity_loss"], ad["sparsity_loss"], rtol=1e-5, atol=1e-7, err_msg=what)
    np.testing.assert_array_equal(as_["codes"], ad["codes"], err_msg=what)
    for key in ("fired", "l0", "min_kept"):
        np.testing.assert_array_equal(as_[key], ad[key], err_msg=f"{what} {key}")
    for name in gd:
        if name == "threshold":  # not trained by gradients
            continue
        scale = float(jnp.max(jnp.abs(gd[name]))) + 1e-12
        np.testing.assert_allclose(gs[name], gd[name], rtol=1e-4, atol=1e-5 * scale, err_msg=f"{what} grad {name}")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_dead", [0, 3, 30])  # none; fewer than k_aux=5; more than k_aux over 4 blocks
def test_loss_and_every_gradient_match_dense(arch, n_dead):
    cfg, p, x = _setup(arch)
    dead = _dead(n_dead)
    _assert_same(_dense_j(p, cfg, x, dead), _sparse_j(p, cfg, x, dead), f"{arch} dead={n_dead}")
    if n_dead:
        assert float(_dense_j(p, cfg, x, dead)[0][1]["sparsity_loss"]) > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_kept_values_below_zero_carry_no_gradient(arch):
    cfg, p, x = _setup(arch)
    p["b_enc"] = p["b_enc"] - 1.5  # many rows keep pre-activations <= 0 (codes 0, no gradient)
    dead = _dead(3)
    pre = sae.pre_activations(p, x)
    assert float(jnp.min(jax.lax.top_k(pre, cfg.k)[0])) < 0
    _assert_same(_dense_j(p, cfg, x, dead), _sparse_j(p, cfg, x, dead), f"{arch} negative kept values")


def test_sae_loss_dispatches_to_the_kernel():
    cfg, p, x = _setup("topk")
    dead = _dead(10)
    sparse_cfg = cfg.replace(kernel="sparse")
    via_sae = jax.jit(lambda q: jax.value_and_grad(sae.loss, has_aux=True)(q, sparse_cfg, x, dead))(p)
    assert "code_latents" in via_sae[0][1]  # the kernel ran
    _assert_same(_dense_j(p, cfg, x, dead), via_sae, "sae.loss kernel=sparse")


def test_batchtopk_when_one_row_takes_most_of_the_batch():
    cfg, p, x = _setup("batchtopk")
    x = x.at[0].multiply(50.0)  # row 0 owns more than 4k of the batch top-k*B
    pre = sae.pre_activations(p, x)
    assert int(jnp.sum(sae.batch_topk_codes(pre, cfg.k)[0] > 0)) > 4 * cfg.k
    dead = _dead(4)
    _assert_same(_dense_j(p, cfg, x, dead), _sparse_j(p, cfg, x, dead), "one row takes most")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_matches_dense_under_vmap(arch):
    cfg, _, x = _setup(arch)
    ps = [_setup(arch, seed=s)[1] for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *ps)
    dead = jnp.stack([_dead(0), _dead(2, 1), _dead(25, 2)])  # members need 0, 1 and 4 AuxK blocks
    dense = jax.jit(jax.vmap(lambda q, d: _dense(q, cfg, x, d)))(stacked, dead)
    sparse = jax.jit(jax.vmap(lambda q, d: _sparse(q, cfg, x, d)))(stacked, dead)
    for j in range(3):
        pick = lambda t: jax.tree.map(lambda a: a[j], t)  # noqa: E731
        _assert_same(pick(dense), pick(sparse), f"{arch} member {j}")


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_gradients_follow_the_cotangents_of_mse_and_auxk(arch):
    # the kernel forms the reconstruction gradients for a unit cotangent: other weights must scale them
    cfg, p, x = _setup(arch)
    dead = _dead(30)

    def weighted(loss_fn, q):
        aux = loss_fn(q)[1]
        return 3.0 * aux["mse"] - 0.5 * aux["sparsity_loss"]

    dense = jax.grad(lambda q: weighted(lambda r: sae.loss(r, cfg.replace(kernel="dense"), x, dead), q))(p)
    spec = kernels.spec_of(cfg, **SMALL)
    sparse = jax.grad(lambda q: weighted(lambda r: kernels.sparse_loss(r, cfg, x, dead, spec), q))(p)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        scale = float(jnp.max(jnp.abs(dense[name]))) + 1e-12
        np.testing.assert_allclose(sparse[name], dense[name], rtol=1e-4, atol=1e-5 * scale, err_msg=f"{arch} {name}")


def test_loss_without_gradients_matches_dense():
    for arch in ("topk", "batchtopk"):
        cfg, p, x = _setup(arch)
        dead = _dead(30)
        (ld, ad), _ = _dense_j(p, cfg, x, dead)
        ls, as_ = jax.jit(lambda q: kernels.sparse_loss(q, cfg, x, dead, kernels.spec_of(cfg, **SMALL)))(p)
        np.testing.assert_allclose(ls, ld, rtol=1e-5, err_msg=arch)
        np.testing.assert_array_equal(as_["codes"], ad["codes"], err_msg=arch)


def test_refuses_to_differentiate_the_codes():
    cfg, p, x = _setup("topk")
    dead = _dead(0)
    with pytest.raises(SaeensError):
        jax.grad(lambda q: _core_codes_sum(q, cfg, x, dead))(p)


def _core_codes_sum(q, cfg, x, dead):
    out = kernels._core(kernels.spec_of(cfg), q["W_enc"], q["b_enc"], q["W_dec"], q["b_dec"], x, dead)
    return jnp.sum(out[2])


@pytest.mark.parametrize("B_,M_,k,block", [(33, 64, 4, 4), (9, 70, 3, 8), (16, 4608, 32, 16), (6, 10, 3, 16)])
def test_row_top_k_selects_what_lax_top_k_selects(B_, M_, k, block):
    # (9, 70): 70 % 8 latents past the last whole block; (6, 10): too narrow to prune, plain top-k
    pre = jnp.asarray(np.random.default_rng(B_).normal(size=(B_, M_)), jnp.float32)
    vals, idx = jax.jit(topk.row_top_k, static_argnums=(1, 2))(pre, k, block)
    ref_vals, ref_idx = jax.lax.top_k(pre, k)
    np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(ref_idx, axis=1))
    np.testing.assert_array_equal(np.sort(vals, axis=1), np.sort(ref_vals, axis=1))
    assert idx.dtype == jnp.int32


@pytest.mark.parametrize("M_", [96, 98])  # 98: the last block is padded
def test_batch_top_k_selects_the_batch_largest(M_):
    pre = jnp.asarray(np.random.default_rng(0).normal(size=(24, M_)), jnp.float32)
    pre = pre.at[3].multiply(20.0)  # row 3 owns far more than k of the batch's largest
    for p_ in (pre, pre / jnp.abs(pre).max(axis=1, keepdims=True)):
        vals, rows, lats = jax.jit(topk.batch_top_k, static_argnums=(1, 2))(p_, 2, 4)
        ref = np.zeros(p_.size, bool)
        ref[np.argsort(-np.asarray(p_).reshape(-1))[: 2 * p_.shape[0]]] = True
        got = np.zeros(p_.shape, bool)
        got[np.asarray(rows), np.asarray(lats)] = True
        np.testing.assert_array_equal(got, ref.reshape(p_.shape))
        assert np.all(np.diff(np.asarray(rows)) >= 0)  # grouped by token
        np.testing.assert_array_equal(vals, np.asarray(p_)[np.asarray(rows), np.asarray(lats)])


def test_batch_top_k_with_ties_keeps_exactly_k_per_token_on_average():
    # integer pre-activations: the n-th largest value is shared by many entries
    pre = jnp.asarray(np.random.default_rng(1).integers(-3, 4, size=(16, 64)), jnp.float32)  # many ties
    n = 16 * 20
    vals, rows, lats = jax.jit(topk.batch_top_k, static_argnums=(1, 2))(pre, 20, 4)
    assert vals.shape == (n,) and len(set(zip(np.asarray(rows), np.asarray(lats)))) == n
    nth = np.sort(np.asarray(pre).reshape(-1))[::-1][n - 1]
    assert np.sum(np.asarray(pre) == nth) > 1 and np.sum(np.asarray(pre) > nth) > 0  # a tie at the n-th
    assert np.all(np.asarray(vals) >= nth) and np.sum(np.asarray(vals) > nth) == np.sum(np.asarray(pre) > nth)


def test_refuses_to_differentiate_the_input():
    cfg, p, x = _setup("topk")
    with pytest.raises(SaeensError):
        jax.grad(lambda xx: kernels.sparse_loss(p, cfg, xx, _dead(0))[0])(x)


# topk single training is covered by the bagging case (vmap of the same single step)
def _train(arch, kernel, method="single", steps=6, J=2):
    # dead_tokens = one batch: latents that miss a batch are dead at the next step, so AuxK is active
    cfg = SAEConfig(d_in=D, width=M, arch=arch, k=3, aux_k=4, dead_tokens=64, kernel=kernel)
    tcfg = TrainConfig(n_tokens=64 * steps, batch_size=64, lr=3e-3)
    opt = make_optimizer(tcfg)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(steps, 64, D)).astype(np.float32)
    key = jax.random.key(3)
    if method == "single":
        state = init_state(key, cfg, tcfg, jnp.asarray(data[0]), opt)
        step = jax.jit(make_step(cfg, opt))
    elif method == "bagging":
        state = bagging.init_members(key, cfg, tcfg, jnp.asarray(data[0]), J, opt)
        step = jax.jit(bagging.make_bagging_step(cfg, opt))
    else:
        state = boosting.init_stages(key, cfg, tcfg, jnp.asarray(data[0]), J, opt)
        step = jax.jit(boosting.make_boosting_step(cfg, opt, steps // J))
    dead_seen = 0.0
    for s in range(steps):
        state, metrics = step(state, jnp.asarray(data[s]), jax.random.fold_in(key, s))
        dead_seen = max(dead_seen, float(jnp.max(metrics["dead_fraction"])))
    return state, dead_seen


@pytest.mark.parametrize("arch,method", [("batchtopk", "single"), ("topk", "bagging"), ("topk", "boosting")])
def test_training_steps_match_dense(arch, method):
    dense, dead_seen = _train(arch, "dense", method)
    sparse, _ = _train(arch, "sparse", method)
    assert dead_seen > 0  # AuxK took part
    for name, leaf in dense.params.items():
        np.testing.assert_allclose(sparse.params[name], leaf, rtol=1e-4, atol=1e-5, err_msg=f"{arch} {method} {name}")
    np.testing.assert_array_equal(sparse.since_fired, dense.since_fired)


@pytest.mark.parametrize("B_", [1, 37, 300])
def test_topk_residual_is_the_input_minus_the_reconstruction(B_):
    """Boosting's residual passes: the sparse forward equals x - sae.forward (a NumPy TopK too)."""
    cfg = SAEConfig(d_in=24, width=160, k=5, arch="topk")
    params = sae.init(jax.random.key(3), cfg, jnp.full((24,), 0.3))
    x = jax.random.normal(jax.random.key(4), (B_, 24)) * 2.0
    got = np.asarray(kernels.topk_residual(params, cfg, x))
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    pre = (np.asarray(x, np.float64) - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    keep = np.argsort(-pre, axis=1)[:, :5]
    codes = np.zeros_like(pre)
    np.put_along_axis(codes, keep, np.maximum(np.take_along_axis(pre, keep, 1), 0), 1)
    want = np.asarray(x, np.float64) - (codes @ p["W_dec"] + p["b_dec"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(got, np.asarray(x - sae.forward(params, cfg, x)[0]), rtol=1e-5, atol=1e-5)
