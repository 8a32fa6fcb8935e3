"""saeens.features against brute-force NumPy: top contexts, statistics, matches, stability, the
consensus ensemble (and its one-SAE export), logit effects, and the `saeens features` command."""

from __future__ import annotations

import json
from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest
from features_helpers import HOOK, make_cache, make_ensemble

from saeens import ensemble, metrics, sae
from saeens.cli import main
from saeens.config import EnsembleConfig, RunConfig, TrainConfig
from saeens.data.cache import ActivationCache
from saeens.data.tokens import byte_tokenizer
from saeens.features import (
    FeaturesConfig,
    analyse,
    consensus_forward,
    consensus_keep,
    consensus_sae,
    feature_pass,
    hist_edges,
    logit_effects,
    member_matches,
    run_matches,
)
from saeens.features.stats import chunk_top, even_chunks
from saeens.io.saelens import load_saelens
from saeens.runs import save_ensemble


@pytest.fixture(scope="module")
def acts(tmp_path_factory, tiny_model):
    return ActivationCache(make_cache(tmp_path_factory.mktemp("features") / "acts", tiny_model))


def all_codes(ens, acts, split):
    x = np.concatenate(list(acts.chunks(split, 10_000)))
    return x, np.asarray(ensemble.encode(ens, jnp.asarray(x)))


@pytest.mark.parametrize("arch,method", [("relu", "bagging"), ("topk", "boosting")])
def test_one_pass_equals_brute_force(acts, arch, method):
    ens = make_ensemble(arch, method)
    x, codes = all_codes(ens, acts, "all")
    keep = np.arange(ens.width) % 3 == 0
    N = 7
    st = feature_pass(ens, acts.chunks("all", 573), keep, top_n=N, progress=False)  # 5 chunks: top-N merges across them
    assert st["n_tokens"] == x.shape[0]
    on = codes > 0
    np.testing.assert_allclose(st["frequency"], on.mean(0))
    np.testing.assert_allclose(st["max_act"], codes.max(0), rtol=1e-6)
    np.testing.assert_allclose(st["mean_act"], codes.sum(0) / np.maximum(on.sum(0), 1), rtol=1e-4, atol=1e-6)
    for f in range(ens.width):
        order = np.argsort(-codes[:, f], kind="stable")[:N]
        order = order[codes[order, f] > 0]
        got = st["top_row"][f, : order.size]
        if not order.size:  # a dead feature: no row at all
            assert np.all(st["top_row"][f] == -1) and not st["hist"][f].any()
            continue
        assert np.all(st["top_row"][f, order.size :] == -1) and np.unique(got).size == got.size
        np.testing.assert_allclose(st["top_value"][f, : order.size], codes[order, f], rtol=1e-5)
        # the same rows, but rows whose codes tie (repeated text: equal up to float rounding) may swap
        np.testing.assert_allclose(codes[got, f], codes[order, f], rtol=1e-5)
        distinct = np.abs(np.diff(codes[order, f])) > 1e-4 * codes[:, f].max()
        sure = np.concatenate([[True], distinct]) & np.concatenate([distinct, [True]])
        np.testing.assert_array_equal(got[sure], order[sure])
        counts = np.histogram(np.clip(codes[on[:, f], f], 1.001e-3, 0.999e5), bins=hist_edges())[0]
        np.testing.assert_array_equal(st["hist"][f], counts)
    # the full and consensus metrics are saeens.metrics' streaming evaluation of those ensembles
    want = metrics.evaluate_stream(partial(consensus_forward, ens, jnp.asarray(np.flatnonzero(keep))), acts.chunks("all", 573),
                                   int(keep.sum()), cofire=False)
    for k in ("mse", "explained_variance", "l0", "dead_fraction"):
        np.testing.assert_allclose(st["metrics_consensus"][k], want[k], rtol=1e-5)
    full = metrics.evaluate_stream(partial(ensemble.forward, ens), acts.chunks("all", 573), ens.width, cofire=False)
    np.testing.assert_allclose(st["metrics_full"]["mse"], full["mse"], rtol=1e-5)


def test_chunk_top_equals_full_top_k_ties_included():
    rng = np.random.default_rng(0)
    cand = np.where(rng.random((203, 5)) < 0.3, rng.integers(1, 4, (203, 5)).astype(np.float32), -np.inf)  # many ties
    for n in (1, 7, 40):
        val, row = chunk_top(jnp.asarray(cand), n)
        order = np.argsort(-cand, axis=0, kind="stable")[:n].T
        np.testing.assert_array_equal(np.asarray(val), np.take_along_axis(cand.T, order, 1))
        finite = np.isfinite(np.asarray(val))
        np.testing.assert_array_equal(np.asarray(row)[finite], order[finite])


def test_even_chunks_keep_every_row_in_order():
    parts = [np.arange(a, b)[:, None] for a, b in ((0, 3), (3, 8), (8, 8), (8, 13))]
    out = list(even_chunks(iter(parts), 4))
    assert [len(c) for c in out] == [4, 4, 4, 1]
    np.testing.assert_array_equal(np.concatenate(out)[:, 0], np.arange(13))


def test_contexts_are_the_cache_text_around_the_row(acts, tiny_model):
    ens = make_ensemble("relu")
    rec = analyse(ens, {"name": "r"}, acts, [], FeaturesConfig(split="test", top_n=3, before=5, after=2), tiny_model,
                  byte_tokenizer(), progress=False)
    x, codes = all_codes(ens, acts, "test")
    tokens = acts.tokens("test")
    per_ctx = acts.meta["rows_per_context"]
    contexts = np.load(acts.path / "contexts_test.npy")
    assert len(rec["features"]) == ens.width
    for feat in rec["features"]:
        f = feat["id"]
        for c in feat["contexts"]:
            r = c["row"]
            ctx_lo = r - r % per_ctx
            lo, hi = max(ctx_lo, r - 5), min(ctx_lo + per_ctx, r + 3, tokens.size)
            assert c["tokens"] == [byte_tokenizer().decode([int(t)]) for t in tokens[lo:hi]]
            assert c["focus"] == r - lo
            np.testing.assert_allclose(c["acts"], codes[lo:hi, f], rtol=1e-3, atol=1e-4)
            assert c["acts"][c["focus"]] == pytest.approx(c["value"], rel=1e-3)
            assert (c["context"], c["position"]) == (r // per_ctx, 1 + r % per_ctx)
            assert c["document"] == contexts[r // per_ctx, 0]
        assert feat["logits"]["promoted"][0][1] >= feat["logits"]["suppressed"][0][1]


def numpy_cos(A, B):
    A = A / np.linalg.norm(A, axis=-1, keepdims=True)
    B = B / np.linalg.norm(B, axis=-1, keepdims=True)
    return A @ B.T


def test_matches_and_stability_equal_numpy():
    ens = make_ensemble("relu", J=4, shared=5)
    J, M = ens.n_members, ens.cfg.width
    W = np.asarray(ensemble.decoder(ens))
    E = np.asarray(ens.params["W_enc"]).transpose(0, 2, 1).reshape(J * M, -1)
    mm = member_matches(ens)
    for j in range(J):
        for name, A in (("dec", W), ("enc", E)):
            cos = numpy_cos(A, A[j * M : (j + 1) * M])
            own = np.arange(J * M) // M == j
            np.testing.assert_array_equal(mm[f"{name}_latent"][~own, j], cos[~own].argmax(1))
            np.testing.assert_allclose(mm[f"{name}_cos"][~own, j], cos[~own].max(1), rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(mm[f"{name}_latent"][own, j], np.arange(M))
    best = np.stack([numpy_cos(W, W[j * M : (j + 1) * M]).max(1) for j in range(J)], 1)
    best[np.arange(J * M), np.arange(J * M) // M] = 1.0
    np.testing.assert_array_equal(mm["consensus"], (best >= 0.7).sum(1))
    assert mm["consensus"][:5].min() == J and mm["consensus"][5:M].max() < J  # the planted shared features

    rng = np.random.default_rng(3)
    others = [W[rng.permutation(J * M)[:20]] + 0.01 * rng.standard_normal((20, W.shape[1])), rng.standard_normal((30, W.shape[1]))]
    rm = run_matches(ens, [jnp.asarray(o) for o in others])
    cos = [numpy_cos(W, o) for o in others]
    np.testing.assert_array_equal(rm["feature"], np.stack([c.argmax(1) for c in cos], 1))
    np.testing.assert_allclose(rm["cos"], np.stack([c.max(1) for c in cos], 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rm["stability"], np.mean([c.max(1) >= 0.7 for c in cos], 0))
    assert 0 < rm["stability"].mean() < 1


def numpy_codes(ens, x, arch):
    """Member by member, weighted (boosting: each stage on the residual of the earlier ones)."""
    p = {k: np.asarray(v) for k, v in ens.params.items()}
    w = np.asarray(ens.weights)
    r, out = x.copy(), []
    for j in range(ens.n_members):
        inp = r if ens.sequential else x
        pre = (inp - p["b_dec"][j]) @ p["W_enc"][j] + p["b_enc"][j]
        if arch == "topk":
            kth = -np.sort(-pre, axis=1)[:, ens.cfg.k - 1 : ens.cfg.k]
            c = np.where(pre >= kth, np.maximum(pre, 0), 0)
        else:
            c = np.maximum(pre, 0)
        r = r - (c @ p["W_dec"][j] + p["b_dec"][j])
        out.append(w[j] * c)
    return np.concatenate(out, 1)


@pytest.mark.parametrize("arch,method", [("relu", "bagging"), ("topk", "bagging"), ("topk", "boosting")])
def test_consensus_reconstruction_is_the_shared_features_contribution(acts, arch, method):
    ens = make_ensemble(arch, method, J=3)
    keep = consensus_keep(member_matches(ens)["consensus"], 2, 3)
    assert 0 < keep.sum() < ens.width
    x = np.concatenate(list(acts.chunks("test", 10_000)))[:200]
    c = numpy_codes(ens, x, arch)
    W = np.asarray(ensemble.decoder(ens))
    want = sum(np.outer(c[:, f], W[f]) for f in np.flatnonzero(keep)) + np.asarray(ensemble.decoder_bias(ens))
    x_hat, kept = consensus_forward(ens, jnp.flatnonzero(keep), jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(x_hat), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(kept), c[:, keep], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk"])
def test_consensus_sae_equals_consensus_ensemble(acts, arch):
    ens = make_ensemble(arch, J=3)
    keep = consensus_keep(member_matches(ens)["consensus"], 2, 3)
    cfg, params = consensus_sae(ens, keep)
    x = jnp.asarray(np.concatenate(list(acts.chunks("test", 10_000))))
    want_hat, want_codes = consensus_forward(ens, jnp.flatnonzero(keep), x)
    got_hat, got_codes = sae.forward(params, cfg, x)
    assert cfg.width == keep.sum()
    np.testing.assert_allclose(np.asarray(got_codes), np.asarray(want_codes), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_hat), np.asarray(want_hat), rtol=1e-4, atol=1e-5)


def test_logit_effects_are_the_decoder_row_through_final_norm_and_unembedding(tiny_model):
    W = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    got = logit_effects(tiny_model, jnp.asarray(W), k=4, batch=2)
    scale, eps = np.asarray(tiny_model.ln_final.scale_D[...]), tiny_model.cfg.norm_eps
    logits = (W / np.sqrt((W**2).mean(-1, keepdims=True) + eps) * scale) @ np.asarray(tiny_model.W_E_VD[...]).T
    np.testing.assert_array_equal(got["promoted_ids"], np.argsort(-logits, 1)[:, :4])
    np.testing.assert_array_equal(got["suppressed_ids"], np.argsort(logits, 1)[:, :4])
    np.testing.assert_allclose(got["promoted"], -np.sort(-logits, 1)[:, :4], rtol=1e-4, atol=1e-5)


def save_run(run_dir, ens, method, seed):
    run = RunConfig(ens.cfg, TrainConfig(n_tokens=1000, batch_size=10, seed=seed), EnsembleConfig(method, ens.n_members))
    run_dir.mkdir(parents=True)
    save_ensemble(run_dir, run, ens, {"hook": HOOK})
    return run_dir


def test_features_command(tmp_path, acts, capsys):
    a = save_run(tmp_path / "runs" / "relu0", make_ensemble("relu", seed=0), "bagging", 0)
    b = save_run(tmp_path / "runs2" / "relu0", make_ensemble("relu", seed=1), "bagging", 1)
    c = save_run(tmp_path / "boost", make_ensemble("topk", "boosting", seed=2), "boosting", 2)
    out = tmp_path / "dash"
    argv = ["features", str(a), str(b), str(c), "--activations", str(acts.path), "--out", str(out), "--model", "none",
            "--split", "all", "--select", "5", "--top-n", "3", "--quiet"]
    assert main(argv) == 0
    summary = json.loads((out / "features.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["relu0", "relu0-2", "boost"]
    rec = json.loads((out / "relu0" / "features.json").read_text())
    assert rec["other_runs"] == ["relu0-2", "boost"] and len(rec["features"]) == 5
    order = [(-f["consensus"], -f["frequency"]) for f in rec["features"]]
    assert order == sorted(order) and max(f["frequency"] for f in rec["features"]) <= metrics.DENSE_THRESHOLD
    assert all(f["contexts"][0]["tokens"][f["contexts"][0]["focus"]].startswith("#") for f in rec["features"])
    cfg, params = load_saelens(out / "relu0" / "consensus_sae")
    assert cfg.width == rec["consensus"]["kept"] == len(rec["consensus"]["kept_features"])
    assert json.loads((out / "boost" / "features.json").read_text())["consensus"]["export"].startswith("not exported")
    for r in ("relu0", "relu0-2", "boost"):
        assert (out / r / "index.html").is_file() and len(list((out / r / "features").glob("f*.html"))) == 5
    assert main(argv) == 0  # a second run rewrites its own output
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main([*argv[:7], str(other), *argv[8:]]) == 2
    assert "not empty" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"
    assert main([*argv[:7], str(tmp_path / "t5"), *argv[8:], "--consensus-t", "5"]) == 2
    assert "--consensus-t" in capsys.readouterr().err


def test_selection_puts_non_dense_features_first_and_fills_with_dense_ones():
    """A dashboard of n features: non-dense ones (<= 10% of tokens) by consensus then frequency;
    dense ones only fill up when fewer than n others fire; silent features never show."""
    from saeens.features.analysis import select_features

    frequency_F = np.array([0.5, 0.05, 0.0, 0.08, 0.3, 0.05])
    consensus_F = np.array([4, 1, 4, 1, 2, 3])
    np.testing.assert_array_equal(select_features(frequency_F, consensus_F, 3), [5, 3, 1])
    np.testing.assert_array_equal(select_features(frequency_F, consensus_F, 10), [5, 3, 1, 0, 4])
    np.testing.assert_array_equal(select_features(np.array([0.6, 0.7]), np.array([1, 2]), 5), [1, 0])


def test_logit_effects_of_no_features_are_empty_tables(tiny_model):
    from saeens.features.logits import logit_effects

    out = logit_effects(tiny_model, np.zeros((0, tiny_model.cfg.d_model), np.float32), k=3)
    assert {name: a.shape for name, a in out.items()} == {n: (0, 3) for n in ("promoted_ids", "promoted", "suppressed_ids", "suppressed")}
