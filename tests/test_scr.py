"""SCR: exact ablation with the error term, latent ranking and scores on synthetic activations,
the token-level path through a tiny model, and the SCR datasets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import ensemble
from saeens.data.corpora import Document
from saeens.data.labelled import SpuriousDataset, bias_in_bios_scr, has_mention, scr_dataset
from saeens.data.tokens import byte_tokenizer
from saeens.errors import SaeensError
from saeens.evals.probing import pooled
from saeens.evals.scr import (
    PooledSCRData, SCRConfig, ablate_latents, ablate_pooled, ablated_pooled_acts, evaluate_ablation,
    fit_scr_probes, latent_mask, rank_latents, run_scr, score_ci, scr_from_pooled, scr_sets,
)

HOOK = "blocks.0.hook_resid_post"


def test_ablating_nothing_keeps_activations_exactly_and_error_term_is_kept(tiny_bagging):
    x = jax.random.normal(jax.random.key(2), (16, 8)) * 3
    np.testing.assert_array_equal(np.asarray(ablate_latents(tiny_bagging, x, jnp.zeros(tiny_bagging.width))), np.asarray(x))
    m = jnp.asarray(latent_mask(tiny_bagging.width, [0, 3, 17]))
    codes = ensemble.encode(tiny_bagging, x)
    expected = ensemble.decode(tiny_bagging, codes * (1 - m)) + (x - ensemble.decode(tiny_bagging, codes))  # decode(c') + error
    np.testing.assert_allclose(np.asarray(ablate_latents(tiny_bagging, x, m)), np.asarray(expected), atol=1e-5)
    assert not np.allclose(np.asarray(ablate_latents(tiny_bagging, x, m)), np.asarray(x))


def test_pooled_shortcut_equals_token_level_ablation_through_the_model(tiny_model, tiny_bagging):
    rng = np.random.default_rng(3)
    tok = rng.integers(0, 257, (5, 16)).astype(np.int32)  # the shapes of the end-to-end test: one compile
    mask = np.arange(16)[None] < np.array([16, 4, 7, 2, 9])[:, None]
    p = pooled(tiny_model, tiny_bagging, HOOK, tok, mask, batch_size=8)
    W = np.asarray(ensemble.decoder(tiny_bagging))
    for S in ([], [1], [0, 5, 13, 22]):
        tokenwise = ablated_pooled_acts(tiny_model, tiny_bagging, HOOK, tok, mask, S, batch_size=4)
        np.testing.assert_allclose(tokenwise, ablate_pooled(p["acts"], p["codes"], W, S), atol=1e-5)
    np.testing.assert_array_equal(ablate_pooled(p["acts"], p["codes"], W, []), p["acts"])


def _synthetic(rng, n_biased=400, n_bal=100, n_test=100, F=60, D=60):
    """Latents 0/2 fire for spurious s=1/s=0 (clean, like he/she), latents 1/3 for target y=1/y=0
    (noisier), the rest are noise. Activations = codes @ W_dec (orthonormal rows) + small noise."""
    W = np.linalg.qr(rng.normal(size=(D, D)))[0][:F]

    def make(y, s):
        n = len(y)
        c = rng.exponential(0.3, (n, F)) * (rng.random((n, F)) < 0.3)
        c[:, 0], c[:, 2] = 2.0 * s + 0.1 * rng.random(n), 2.0 * (1 - s) + 0.1 * rng.random(n)
        c[:, 1] = np.maximum(y + 0.35 * rng.normal(size=n), 0)
        c[:, 3] = np.maximum((1 - y) + 0.35 * rng.normal(size=n), 0)
        return c @ W + 0.05 * rng.normal(size=(n, D)), c

    yb = np.repeat([0, 1], n_biased // 2)
    a_bi, _ = make(yb, yb)
    yba, sba = np.tile(np.repeat([0, 1], n_bal), 2), np.repeat([0, 1], 2 * n_bal)
    a_ba, c_ba = make(yba, sba)
    yte, ste = np.tile(np.repeat([0, 1], n_test), 2), np.repeat([0, 1], 2 * n_test)
    a_te, c_te = make(yte, ste)
    b = lambda v: np.asarray(v, bool)  # noqa: E731
    return PooledSCRData(a_bi, b(yb), a_ba, c_ba, b(yba), b(sba), a_te, c_te, b(yte), b(ste)), W


def test_ablating_the_spurious_latents_removes_the_bias_and_random_ones_do_not():
    rng = np.random.default_rng(0)
    data, W = _synthetic(rng)
    cfg = SCRConfig(n_ablated=(2, 5), random_control=True)
    probes = fit_scr_probes(data, cfg)
    assert probes.oracle_accuracy > probes.biased_accuracy + 0.15  # the biased probe leans on s
    assert set(rank_latents(probes, data, W)[:2]) == {0, 2}
    top = evaluate_ablation(probes, data, W, [0, 2])
    assert top.score > 0.6 and top.spurious_accuracy < 0.6  # s is gone, y is read instead
    for _ in range(5):
        rand = evaluate_ablation(probes, data, W, rng.choice(np.arange(4, 60), 2, replace=False))
        assert abs(rand.score) < 0.15 and rand.spurious_accuracy > 0.95
    assert evaluate_ablation(probes, data, W, []).score == 0.0
    _, abl, rnd, ranking = scr_from_pooled(data, W, cfg)
    assert [a.n_ablated for a in abl] == [2, 5] and len(rnd) == 2 and set(ranking[:2]) == {0, 2}
    assert abl[0] == top


def _tiny_spurious_dataset(n=12):
    docs = []
    for t, word in (("A", "apples"), ("B", "zebras")):
        for s, tail in (("x", " !!!"), ("y", " ...")):
            for i in range(n):
                text = f"{word} {i}{tail}"
                split = "test" if i >= n - 4 else "train"
                docs.append((split, Document(text, t, f"{t}{s}{i}", (("tail", s),))))
    return SpuriousDataset("tiny", ("A", "B"), "tail", ("x", "y"),
                           tuple(d for sp, d in docs if sp == "train"), tuple(d for sp, d in docs if sp == "test"))


def test_run_scr_end_to_end_on_a_tiny_model(tiny_model, tiny_bagging):
    ds = _tiny_spurious_dataset()
    cfg = SCRConfig(n_ablated=(1, 3, 100), n_train_per_group=6, n_test_per_group=4, batch_size=8, context_length=16)
    res = run_scr(tiny_model, byte_tokenizer(), tiny_bagging, HOOK, ds, cfg)
    assert res.group_counts["biased_train"] == {"A/x": 6, "A/y": 0, "B/x": 0, "B/y": 6}
    assert res.group_counts["balanced_train"] == {"A/x": 3, "A/y": 3, "B/x": 3, "B/y": 3}
    assert res.group_counts["test"] == {"A/x": 4, "A/y": 4, "B/x": 4, "B/y": 4}
    assert [a.n_ablated for a in res.ablations] == [1, 3, 24]  # capped at the ensemble width
    d = res.to_dict()
    assert {"scr_metric_top_1", "scr_metric_top_3", "biased_accuracy", "oracle_accuracy"} <= set(d)
    assert len(res.top_latents) == 24 and sorted(res.top_latents) == list(range(24))
    with pytest.raises(SaeensError, match="too few documents"):
        scr_sets(ds, SCRConfig(n_train_per_group=50))


def test_tweets_mention_groups_and_bias_in_bios_local_file(tmp_path):
    assert has_mention("@bob hi") and has_mention("hi @bob!") and not has_mention("mail a@b.com") and not has_mention("@ x")
    ds = scr_dataset("tweets-mention")
    c = ds.group_counts()
    assert c["train"] == {"negative/yes": 10786, "negative/no": 1969, "positive/yes": 3444, "positive/no": 2029}
    assert c["test"] == {"negative/yes": 2662, "negative/no": 548, "positive/yes": 867, "positive/no": 483}
    assert not {d.doc_id for d in ds.train} & {d.doc_id for d in ds.test}
    import datasets

    path = str(tmp_path / "bib.parquet")
    datasets.Dataset.from_dict({
        "hard_text": [f"bio {i}" for i in range(40)],
        "profession": [21, 13, 0, 13] * 10,  # professor, nurse, accountant, nurse
        "gender": [0, 1, 1, 0] * 10,
    }).to_parquet(path)
    bib = bias_in_bios_scr(("professor", "nurse"), data_files=path)
    assert bib.spurious == "gender" and bib.spurious_values == ("male", "female")
    assert len(bib.train) + len(bib.test) == 30 and not {d.doc_id for d in bib.train} & {d.doc_id for d in bib.test}
    assert {bib.group(d) for d in bib.train + bib.test} == {("professor", "male"), ("nurse", "female"), ("nurse", "male")}
    assert bias_in_bios_scr(("professor", "nurse"), data_files=path) == bib  # deterministic


def test_latents_are_ranked_by_absolute_effect():
    """A latent that pushes the spurious probe the OTHER way (negative effect) carries the attribute
    as much as one that pushes it forward: SAEBench ranks by |effect|, and so does rank_latents."""
    from types import SimpleNamespace

    F, D = 6, 6
    W = np.eye(F, D)
    s = np.repeat([True, False], 50)
    codes = np.zeros((100, F))
    codes[s, 4] = 3.0  # fires with s; its decoder row points against the probe: effect -3
    codes[s, 1] = 1.0  # effect +1
    codes[~s, 2] = 0.5  # fires without s, decoder row against the probe: effect (-0.5)(-1) = +0.5
    w = np.array([0.0, 1.0, -1.0, 0.0, -1.0, 0.0])
    probes = SimpleNamespace(spurious=SimpleNamespace(raw_weight=w))
    data = SimpleNamespace(codes_balanced=codes, s_balanced=s)
    assert list(rank_latents(probes, data, W)[:3]) == [4, 1, 2]


def test_default_grid_reaches_500_latents():
    assert SCRConfig().n_ablated[-1] == 500 and 100 in SCRConfig().n_ablated


def test_score_interval_is_a_bootstrap_over_test_documents():
    rng = np.random.default_rng(0)
    data, W = _synthetic(rng)
    probes = fit_scr_probes(data, SCRConfig(n_ablated=(2,)))
    top = evaluate_ablation(probes, data, W, [0, 2])
    low, high = score_ci(probes, data, W, [0, 2])
    assert low < top.score < high and high - low < 0.5
    assert score_ci(probes, data, W, [0, 2]) == (low, high)  # seeded
    rlow, rhigh = score_ci(probes, data, W, [10, 11])
    assert rlow <= 0.0 <= rhigh  # a random pair of latents: no effect beyond the noise
