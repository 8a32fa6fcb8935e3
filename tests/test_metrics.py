"""saeens.metrics against plain NumPy references (float64, loops where that is clearer)."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sps

from saeens import ensemble, metrics
from saeens.config import SAEConfig

# ---------------------------------------------------------------- NumPy references


def ref_ev_per_dim(x, x_hat):
    x, x_hat = np.float64(x), np.float64(x_hat)
    out = []
    for d in range(x.shape[1]):
        sse = np.sum((x[:, d] - x_hat[:, d]) ** 2)
        sst = np.sum((x[:, d] - x[:, d].mean()) ** 2)
        out.append(1 - sse / sst)
    return float(np.mean(out))


def ref_ev_per_token(x, x_hat):
    x, x_hat = np.float64(x), np.float64(x_hat)
    mu = x.mean(0)
    return float(np.mean([1 - np.sum((x[t] - x_hat[t]) ** 2) / np.sum((x[t] - mu) ** 2) for t in range(len(x))]))


def ref_mse(x, x_hat):
    x, x_hat = np.float64(x), np.float64(x_hat)
    return float(np.mean([np.sum((x[t] - x_hat[t]) ** 2) for t in range(len(x))]))


def ref_gamma(x, x_hat):
    x, x_hat = np.float64(x), np.float64(x_hat)
    return float(np.mean(np.sum(x_hat**2, 1)) / np.mean(np.sum(x * x_hat, 1)))


def ref_sparsity(codes):
    Z = np.asarray(codes) != 0
    N, F = Z.shape
    rate = Z.mean(0)
    co = np.zeros((F, F), bool)
    for t in range(N):
        idx = np.flatnonzero(Z[t])
        for i in idx:
            co[i, idx] = True
    return {
        "l0": float(Z.sum(1).mean()),
        "dead_fraction": float(np.mean(rate == 0)),
        "dense_fraction": float(np.mean(rate > 0.1)),
        "connectivity": float(1 - co.sum() / F**2),
    }


def cos_np(A, B):
    A = np.float64(A) / np.linalg.norm(A, axis=1, keepdims=True)
    B = np.float64(B) / np.linalg.norm(B, axis=1, keepdims=True)
    return A @ B.T


def ref_diversity(W, thr=0.7):
    C = cos_np(W, W)
    F = len(W)
    return sum(all(C[i, j] < thr for j in range(F) if j != i) for i in range(F))


def ref_stability(decs):
    out = []
    for r, W in enumerate(decs):
        others = np.concatenate([V for s, V in enumerate(decs) if s != r])
        C = cos_np(W, others)
        out.append(np.mean([max(0.0, C[i].max()) for i in range(len(W))]))
    return np.array(out)


def unit_rows(rng, F, D):
    W = rng.standard_normal((F, D)).astype(np.float32)
    return W / np.linalg.norm(W, axis=1, keepdims=True)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def recon():
    """Activations with a large common offset and a reconstruction of moderate quality."""
    rng = np.random.default_rng(0)
    N, D = 600, 16
    scale = rng.uniform(0.5, 3.0, D)
    x = (1000.0 + rng.standard_normal((N, D)) * scale).astype(np.float32)
    x_hat = (x + 0.3 * rng.standard_normal((N, D)) * scale - 0.05).astype(np.float32)
    return x, x_hat


@pytest.fixture(scope="module")
def codes():
    """Codes with 3 dead features, 2 dense ones (~50% firing) and sparse others (~3%)."""
    rng = np.random.default_rng(1)
    N, F = 400, 24
    fire = rng.random((N, F)) < 0.03
    fire[:, :3] = False  # dead
    fire[:, 3:5] = rng.random((N, 2)) < 0.5  # dense
    return (fire * rng.uniform(0.1, 2.0, (N, F))).astype(np.float32)


# ---------------------------------------------------------------- per-batch metrics
# Evaluated under one jax.jit each (fewer compilations than op-by-op, and proves they are jittable).


@jax.jit
def recon_metrics(x_BD, x_hat_BD):
    fns = (metrics.mse, metrics.explained_variance, metrics.explained_variance_per_token,
           metrics.explained_variance_pooled, metrics.fvu, metrics.relative_reconstruction_bias)
    return {fn.__name__: fn(x_BD, x_hat_BD) for fn in fns}


@jax.jit
def sparsity_metrics(codes_BF):
    fns = (metrics.l0, metrics.dead_fraction, metrics.dense_fraction, metrics.connectivity)
    return {fn.__name__: fn(codes_BF) for fn in fns}


def test_reconstruction_metrics_match_numpy(recon):
    x, x_hat = recon
    ev = ref_ev_per_dim(x, x_hat)
    assert 0.5 < ev < 0.99
    got = {k: float(v) for k, v in recon_metrics(x, x_hat).items()}
    assert got["explained_variance"] == pytest.approx(ev, rel=1e-4)
    assert got["fvu"] == pytest.approx(1 - ev, rel=1e-3)
    assert got["explained_variance_per_token"] == pytest.approx(ref_ev_per_token(x, x_hat), rel=1e-4)
    assert got["mse"] == pytest.approx(ref_mse(x, x_hat), rel=1e-4)
    assert got["relative_reconstruction_bias"] == pytest.approx(ref_gamma(x, x_hat), rel=1e-4)
    x64, xh64 = np.float64(x), np.float64(x_hat)
    pooled = 1 - np.sum((x64 - xh64) ** 2) / np.sum((x64 - x64.mean(0)) ** 2)
    assert got["explained_variance_pooled"] == pytest.approx(pooled, rel=1e-4)
    # eager (op-by-op) gives the same value as jit
    assert float(metrics.explained_variance(x, x_hat)) == pytest.approx(got["explained_variance"], rel=1e-5)


def test_ev_skips_constant_dimension_and_gamma_detects_shrinkage():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((200, 6)).astype(np.float32)
    x[:, 0] = 3.0
    x_hat = x.copy()
    x_hat[:, 1:] += 0.1 * rng.standard_normal((200, 5)).astype(np.float32)
    got = recon_metrics(x, x_hat)
    assert float(got["explained_variance"]) == pytest.approx(ref_ev_per_dim(x[:, 1:], x_hat[:, 1:]), rel=1e-5)
    assert float(recon_metrics(x, 0.8 * x)["relative_reconstruction_bias"]) == pytest.approx(0.8, rel=1e-5)


def test_sparsity_metrics_match_numpy(codes):
    ref = ref_sparsity(codes)
    assert ref["dead_fraction"] == pytest.approx(3 / 24) and ref["dense_fraction"] == pytest.approx(2 / 24)
    assert 0 < ref["connectivity"] < 1
    got = {k: float(v) for k, v in sparsity_metrics(codes).items()}
    assert got["l0"] == pytest.approx(ref["l0"], rel=1e-6)
    assert got["dead_fraction"] == pytest.approx(ref["dead_fraction"])
    assert got["dense_fraction"] == pytest.approx(ref["dense_fraction"])
    assert got["connectivity"] == pytest.approx(ref["connectivity"], abs=1e-6)


# ---------------------------------------------------------------- dictionary metrics


def test_diversity_counts_near_duplicates():
    rng = np.random.default_rng(3)
    W = unit_rows(rng, 50, 64)
    W[45:50] = W[0:5] + 0.05 * rng.standard_normal((5, 64)).astype(np.float32)  # 5 near-duplicate pairs
    W[40] = W[41]  # an exact duplicate: still not diverse (only the diagonal is masked)
    expected = ref_diversity(W)
    assert expected == 50 - 10 - 2
    assert int(metrics.diversity(W)) == expected
    assert int(metrics.diversity(W, block_size=7)) == expected  # blocked path, with padding
    assert float(metrics.diversity_fraction(W)) == pytest.approx(expected / 50)
    assert int(metrics.diversity(W, threshold=1.01)) == 50


def test_max_cosine_blocks_match_dense():
    rng = np.random.default_rng(4)
    A, B = unit_rows(rng, 37, 8), unit_rows(rng, 23, 8)
    np.testing.assert_allclose(metrics.max_cosine(A, B, block_size=5), cos_np(A, B).max(1), atol=1e-6)
    C = cos_np(A, A)
    np.fill_diagonal(C, -np.inf)
    np.testing.assert_allclose(metrics.max_cosine(A, A, exclude_self=True, block_size=8), C.max(1), atol=1e-6)


def test_stability_matches_reference_and_extremes():
    rng = np.random.default_rng(5)
    W = unit_rows(rng, 40, 32)
    perm = [W[rng.permutation(40)] for _ in range(2)]
    same = metrics.stability([W, *perm])
    assert same["mean"] == pytest.approx(1.0, abs=1e-5)
    assert same["ci_half_width"] == pytest.approx(0.0, abs=1e-5)

    rand = metrics.stability([unit_rows(rng, 40, 32) for _ in range(3)])
    assert rand["mean"] < 0.6

    # partly shared runs: compare with the loop reference and the t interval
    decs = []
    for _ in range(4):
        V = unit_rows(rng, 40, 32)
        V[:20] = W[:20] + 0.2 * rng.standard_normal((20, 32)).astype(np.float32)
        decs.append(V)
    ref = ref_stability(decs)
    out = metrics.stability(decs)
    np.testing.assert_allclose(out["scores"], ref, rtol=1e-5)
    half = sps.t.ppf(0.975, 3) * ref.std(ddof=1) / 2.0
    assert out["mean"] == pytest.approx(ref.mean(), rel=1e-5)
    assert out["ci_half_width"] == pytest.approx(half, rel=1e-4)
    assert out["ci_low"] < out["mean"] < out["ci_high"]
    with pytest.raises(ValueError, match="at least 2"):
        metrics.stability([W])


def test_stability_per_member_splits_each_runs_features_by_member():
    """Member 0 of every run is (nearly) one shared dictionary, member 1 is each run's own noise: the
    split shows which member the other runs reproduce, each block against the loop reference."""
    rng = np.random.default_rng(11)
    J, m, d = 2, 12, 16
    W = unit_rows(rng, m, d)
    decs = [np.concatenate([W + 0.05 * rng.standard_normal((m, d)).astype(np.float32), unit_rows(rng, m, d)])
            for _ in range(3)]
    best = metrics.max_cosines_to_others(decs)
    for r, b in enumerate(best):  # the vector stability averages: each feature's max cosine to the other runs
        others = np.concatenate([D for q, D in enumerate(decs) if q != r])
        np.testing.assert_allclose(b, cos_np(decs[r], others).max(1), atol=1e-6)
    per_RJ = metrics.stability_per_member(best, J)
    ref_RJ = np.array([[np.maximum(b[j * m:(j + 1) * m], 0).mean() for j in range(J)] for b in best])
    np.testing.assert_allclose(per_RJ, ref_RJ, rtol=1e-6)
    assert (per_RJ[:, 0] > 0.95).all() and (per_RJ[:, 1] < 0.8).all()
    out = metrics.stability(decs, members=J)  # the run's score is the mean of its members' (equal blocks)
    np.testing.assert_allclose(out["per_member"], ref_RJ.mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["scores"], ref_RJ.mean(1), rtol=1e-6)
    assert "per_member" not in metrics.stability(decs)
    assert metrics.stability_of_best(best, members=J) == out  # from vectors kept instead of the decoders
    with pytest.raises(ValueError):
        metrics.stability_per_member(best, 5)  # 24 features do not split into 5 members


def test_hungarian_stability_matches_bruteforce():
    rng = np.random.default_rng(6)
    A, B = unit_rows(rng, 6, 4), unit_rows(rng, 6, 4)
    C = cos_np(A, B)
    best = max(np.mean([C[i, p[i]] for i in range(6)]) for p in itertools.permutations(range(6)))
    out = metrics.hungarian_stability([A, B])
    assert out["mean"] == pytest.approx(best, rel=1e-5)
    assert np.isnan(out["ci_half_width"])  # one pair: no interval

    W = unit_rows(rng, 30, 64)
    same = metrics.hungarian_stability([W, W[rng.permutation(30)], W[rng.permutation(30)]])
    assert same["mean"] == pytest.approx(1.0, abs=1e-5) and len(same["scores"]) == 3
    rand = metrics.hungarian_stability([unit_rows(rng, 30, 64) for _ in range(3)])
    assert rand["mean"] < 0.4


def test_shared_latent_fraction():
    rng = np.random.default_rng(7)
    F, D = 30, 48
    enc, dec = unit_rows(rng, F, D), unit_rows(rng, F, D)
    p = rng.permutation(F)
    assert metrics.shared_latent_fraction(enc, dec, enc[p], dec[p]) == pytest.approx(1.0)
    # encoder scale does not matter (cosine); random runs share nothing
    assert metrics.shared_latent_fraction(3 * enc, dec, enc[p], dec[p]) == pytest.approx(1.0)
    assert metrics.shared_latent_fraction(enc, dec, unit_rows(rng, F, D), unit_rows(rng, F, D)) == 0.0
    # replace the encoder vectors of 10 latents of b: only the other 20 stay shared
    enc_b = enc[p].copy()
    enc_b[:10] = unit_rows(rng, 10, D)
    assert metrics.shared_latent_fraction(enc, dec, enc_b, dec[p]) == pytest.approx(20 / 30)
    with pytest.raises(ValueError, match="W_enc.T"):
        metrics.shared_latent_fraction(enc.T, dec, enc, dec)


def test_mean_ci_uses_student_t():
    v = [0.6, 0.7, 0.65, 0.72]
    out = metrics.mean_ci(v)
    half = sps.t.ppf(0.975, 3) * np.std(v, ddof=1) / 2
    assert out["mean"] == pytest.approx(np.mean(v)) and out["ci_half_width"] == pytest.approx(half)


# ---------------------------------------------------------------- streaming


def _chunks(x, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(x[i : i + s])
        i += s
    assert i == len(x)
    return out


def test_streaming_equals_one_shot_on_an_ensemble():
    rng = np.random.default_rng(8)
    D, M, J = 12, 16, 3
    W_dec = np.stack([unit_rows(rng, M, D) for _ in range(J)])
    b_enc = np.zeros((J, M), np.float32)
    b_enc[0, :4] = -100.0  # dead latents
    b_enc[1, :2] = 5.0  # dense latents
    params_J = {"W_enc": W_dec.transpose(0, 2, 1), "b_enc": b_enc, "W_dec": W_dec,
                "b_dec": 0.1 * rng.standard_normal((J, D)).astype(np.float32)}
    ens = ensemble.bagging(SAEConfig(d_in=D, width=M, arch="relu"), jax.tree.map(jnp.asarray, params_J))
    x = (rng.standard_normal((700, D)) + rng.standard_normal(D)).astype(np.float32)  # a common offset
    fwd = functools.partial(ensemble.forward, ens)
    x_hat, codes = jax.jit(fwd)(x)
    x_hat, codes = np.asarray(x_hat), np.asarray(codes)

    sizes = [350, 350]
    out = metrics.evaluate_stream(fwd, _chunks(x, sizes), J * M, members=J)
    assert set(out) == {
        "mse", "explained_variance", "explained_variance_pooled", "explained_variance_per_token", "fvu", "l0",
        "relative_reconstruction_bias", "dead_fraction", "dense_fraction", "connectivity", "n_tokens", "ev_drivers",
        "l0_per_member", "dead_fraction_per_member",
    }
    fires_NJM = (codes != 0).reshape(len(x), J, M)  # the ensemble's codes: member blocks in order
    np.testing.assert_allclose(out["l0_per_member"], fires_NJM.sum(2).mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["dead_fraction_per_member"], (fires_NJM.sum(0) == 0).mean(1))
    assert out["dead_fraction_per_member"][0] >= 4 / M  # member 0's four dead latents
    assert out["n_tokens"] == 700
    one_shot = {**recon_metrics(x, x_hat), **sparsity_metrics(codes)}
    for k in set(out) - {"n_tokens", "explained_variance_per_token", "ev_drivers", "l0_per_member", "dead_fraction_per_member"}:
        assert out[k] == pytest.approx(float(one_shot[k]), rel=1e-4, abs=1e-6), k
    assert out["dead_fraction"] >= 4 / (J * M) and out["dense_fraction"] >= 2 / (J * M)
    assert 0 < out["connectivity"] < 1
    # per-token EV is centred per chunk (as SAELens per eval batch): token-weighted chunk values
    per_chunk = [ref_ev_per_token(a, b) * len(a) for a, b in zip(_chunks(x, sizes), _chunks(x_hat, sizes))]
    assert out["explained_variance_per_token"] == pytest.approx(sum(per_chunk) / 700, rel=1e-4)
    one = metrics.evaluate_stream(fwd, [x], J * M, cofire=False, progress=True, n_tokens=len(x))
    assert one["explained_variance_per_token"] == pytest.approx(float(one_shot["explained_variance_per_token"]), rel=1e-4)
    assert np.isnan(one["connectivity"]) and one["l0"] == pytest.approx(out["l0"], rel=1e-6)
    assert "l0_per_member" not in one  # members=1: no split


def test_streaming_is_accurate_with_a_large_offset():
    """SST of activations with a mean 1e5 times their spread: E[x^2] - E[x]^2 in float32 would be noise."""
    rng = np.random.default_rng(9)
    N, D, F = 4200, 12, 48  # chunks of the shapes above: no new compilation
    x = (3e4 + 0.3 * rng.standard_normal((N, D))).astype(np.float32)
    x_hat = (x + 0.1 * rng.standard_normal((N, D))).astype(np.float32)
    codes = (rng.random((N, F)) < 0.2).astype(np.float32)
    stats = metrics.init_stats(D, F)
    for i in range(0, N, 350):
        stats = metrics.update_stats_jit(stats, x[i : i + 350], x_hat[i : i + 350], codes[i : i + 350])
    out = metrics.finalize(stats)
    assert out["n_tokens"] == N
    assert out["explained_variance"] == pytest.approx(ref_ev_per_dim(x, x_hat), abs=1e-5)
    assert out["explained_variance_per_token"] == pytest.approx(
        np.mean([ref_ev_per_token(x[i : i + 350], x_hat[i : i + 350]) for i in range(0, N, 350)]), rel=1e-5)
    assert out["mse"] == pytest.approx(ref_mse(x, x_hat), rel=1e-4)
    assert out["relative_reconstruction_bias"] == pytest.approx(ref_gamma(x, x_hat), rel=1e-5)
    assert out["l0"] == pytest.approx(float((codes != 0).sum(1).mean()), rel=1e-6)


def test_ev_drivers_name_the_low_variance_dimension_that_makes_the_mean_negative():
    """One dimension with 0.01% of the variance, reconstructed badly, drives a negative per-dimension
    EV; the pooled EV stays high and ev_drivers names that dimension first, against NumPy."""
    rng = np.random.default_rng(3)
    N, D, F = 4200, 12, 48
    x = rng.standard_normal((N, D)).astype(np.float32) * 10
    x[:, 5] *= 0.01
    x_hat = x + rng.standard_normal((N, D)).astype(np.float32)
    stats = metrics.init_stats(D, F)
    for i in range(0, N, 350):
        stats = metrics.update_stats_jit(stats, x[i : i + 350], x_hat[i : i + 350], np.zeros((350, F), np.float32))
    out = metrics.finalize(stats)
    x64, e64 = np.float64(x), np.float64(x - x_hat)
    sse, sst = (e64**2).sum(0), ((x64 - x64.mean(0)) ** 2).sum(0)
    assert out["explained_variance"] == pytest.approx(1 - np.mean(sse / sst), abs=1e-4) and out["explained_variance"] < 0
    assert out["explained_variance_pooled"] == pytest.approx(1 - sse.sum() / sst.sum(), abs=1e-5) and out["explained_variance_pooled"] > 0.95
    order = np.argsort(-(sse / sst))
    assert [d["dim"] for d in out["ev_drivers"]] == list(order[:5]) and out["ev_drivers"][0]["dim"] == 5
    top = out["ev_drivers"][0]
    assert top["explained_variance"] == pytest.approx(1 - sse[5] / sst[5], rel=1e-4)
    assert top["variance_share"] == pytest.approx(sst[5] / sst.sum(), rel=1e-4) and top["variance_share"] < 1e-4
    assert top["shortfall_share"] == pytest.approx((sse[5] / sst[5]) / (sse / sst).sum(), rel=1e-4) and top["shortfall_share"] > 0.9


def test_evaluate_stream_rejects_bad_input():
    fwd = lambda x: (x, x)  # noqa: E731
    with pytest.raises(ValueError, match="empty"):
        metrics.evaluate_stream(fwd, [], 4)
    with pytest.raises(ValueError, match="d_in"):
        metrics.evaluate_stream(fwd, [np.ones((3, 4), np.float32), np.ones((3, 5), np.float32)], 4)
    with pytest.raises(ValueError, match="n_features"):
        metrics.evaluate_stream(fwd, [np.ones((3, 4), np.float32)], 7)


# ---------------------------------------------------------------- constants pinned near their thresholds


def test_dense_threshold_is_ten_percent_of_tokens():
    """A latent firing on 10.5% of tokens is dense, one on 9.5% is not (batch and streamed)."""
    N = 1000
    codes_BF = np.zeros((N, 2), np.float32)
    codes_BF[:105, 0] = 1.0
    codes_BF[:95, 1] = 1.0
    assert float(metrics.dense_fraction(codes_BF)) == 0.5
    x_BD = np.random.default_rng(0).standard_normal((N, 3)).astype(np.float32)
    streamed = metrics.evaluate_stream(lambda x: (x, jnp.asarray(codes_BF)[: x.shape[0]]), [x_BD], 2)
    assert streamed["dense_fraction"] == 0.5


def test_diversity_threshold_is_cosine_0_7():
    """Two features at cosine 0.69 are both diverse; at 0.71 neither is."""
    for cos, want in ((0.69, 2), (0.71, 0)):
        W_FD = np.array([[1.0, 0.0], [cos, np.sqrt(1 - cos**2)]], np.float32)
        assert int(metrics.diversity(W_FD)) == want, cos


def test_stability_floors_a_negative_best_cosine_at_zero():
    """Run a's e1 has only negative cosines to run b (best -0.707): it scores 0, not -0.707."""
    r = np.sqrt(0.5)
    a_FD = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    b_FD = np.array([[-r, r], [-1.0, 0.0]], np.float32)
    scores = metrics.stability([a_FD, b_FD])["scores"]
    np.testing.assert_allclose(scores, [r / 2, r / 2], rtol=1e-6)
    np.testing.assert_allclose(scores, ref_stability([a_FD, b_FD]), rtol=1e-6)


# ---------------------------------------------------------------- `saeens evaluate` end to end


def test_saeens_evaluate_matches_a_numpy_recomputation(tmp_path):
    """`saeens cache --from-npy` + `train` + `evaluate --json` against the definitions recomputed in
    NumPy from the run's saved weights. Dimensions of very different scales make the paper's EV
    (averaged over dimensions) far from the per-token EV; the test split is one chunk."""
    import json

    from saeens.cli import main
    from saeens.train import load_ensemble

    rng = np.random.default_rng(0)
    scale_D = np.geomspace(0.1, 10.0, 8)
    x_ND = (rng.standard_normal((2000, 8)) * scale_D + 3.0).astype(np.float32)
    np.save(tmp_path / "x.npy", x_ND)
    acts, run, out = tmp_path / "acts", tmp_path / "run", tmp_path / "eval.json"
    assert main(["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(acts), "--test-fraction", "0.25"]) == 0
    assert main(["train", "--activations", str(acts), "--out", str(run), "--method", "bagging", "--members", "2",
                 "--arch", "relu", "--width", "12", "--tokens", "1536", "--batch-size", "128", "--lr", "3e-3",
                 "--quiet"]) == 0
    assert main(["evaluate", str(run), "--activations", str(acts), "--json", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())

    ens, _ = load_ensemble(run)
    p = {k: np.float64(v) for k, v in ens.params.items()}
    w_J = np.float64(ens.weights)
    x = np.float64(x_ND[1500:])  # the last quarter is the test split
    codes_J = [np.maximum((x - p["b_dec"][j]) @ p["W_enc"][j] + p["b_enc"][j], 0.0) for j in range(2)]
    codes = np.concatenate([w_J[j] * codes_J[j] for j in range(2)], axis=1)
    x_hat = sum(w_J[j] * (codes_J[j] @ p["W_dec"][j] + p["b_dec"][j]) for j in range(2))
    W_dec_FD = np.concatenate([p["W_dec"][0], p["W_dec"][1]])
    want = {"mse": ref_mse(x, x_hat), "explained_variance": ref_ev_per_dim(x, x_hat),
            "explained_variance_per_token": ref_ev_per_token(x, x_hat), "fvu": 1 - ref_ev_per_dim(x, x_hat),
            "explained_variance_pooled": 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
            "relative_reconstruction_bias": ref_gamma(x, x_hat), **ref_sparsity(codes),
            "diversity": ref_diversity(W_dec_FD), "n_features": 24, "n_tokens": 500}
    assert abs(want["explained_variance"] - want["explained_variance_per_token"]) > 0.05  # the two EVs differ here
    assert 0 < want["dead_fraction"] + want["dense_fraction"] and want["l0"] > 0  # non-trivial sparsity numbers
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=2e-4, abs=1e-5), key
    assert got["method"] == "bagging" and got["members"] == 2 and got["arch"] == "relu"
