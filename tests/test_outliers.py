"""Massive-activation rows: flagged when a cache closes, recorded in meta.json, added to an old
cache in one pass, and skipped by training, metrics and feature statistics; the spliced loss keeps
them clean."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import ensemble, models, sae
from saeens.config import SAEConfig
from saeens.data.cache import ActivationCache, ArrayActivations, cache_from_array, flag_outliers
from saeens.data.outliers import KeptRows, kept_view
from saeens.data.source import CacheSource
from saeens.errors import SaeensError
from saeens.evals import intrinsic
from saeens.evals.spliced import baseline_losses, outlier_threshold, spliced_losses

D = 6


def _rows(n=400, seed=0):
    """Rows of norm ~sqrt(D), with massive rows (norm x200) planted at known places in both splits."""
    rng = np.random.default_rng(seed)
    x_ND = rng.standard_normal((n, D)).astype(np.float32)
    planted = np.array([3, 57, 200, 371, 390])  # the last two fall in the test split (last 10%)
    x_ND[planted] *= 200.0
    return x_ND, planted


def test_cache_flags_rows_above_factor_times_the_split_median_and_records_it(tmp_path):
    x_ND, planted = _rows()
    out = cache_from_array(x_ND, tmp_path / "c", 0.1, shard_rows=64)
    acts = ActivationCache(out)
    rec = acts.meta["outliers"]
    assert rec["factor"] == 10.0
    for split, lo, hi in (("train", 0, 360), ("test", 360, 400)):
        norms = np.linalg.norm(x_ND[lo:hi], axis=1)
        assert rec["splits"][split]["median_norm"] == pytest.approx(float(np.median(norms)), rel=1e-6)
        assert rec["splits"][split]["threshold"] == pytest.approx(10 * float(np.median(norms)), rel=1e-6)
        want = planted[(planted >= lo) & (planted < hi)] - lo
        np.testing.assert_array_equal(np.flatnonzero(~acts.keep(split)), want)
        assert rec["splits"][split]["flagged"] == len(want) and rec["splits"][split]["rows"] == hi - lo
    assert sorted(p.name for p in out.glob("keep_*.npy")) == [f"keep_{i:05d}.npy" for i in range(len(acts.meta["shards"]))]
    # the row layout is untouched: every row, flagged or not, is still there at its index
    np.testing.assert_array_equal(acts.gather(np.arange(360)), x_ND[:360])


def test_an_old_cache_reads_as_all_kept_until_flag_outliers_adds_masks(tmp_path):
    x_ND, planted = _rows()
    out = cache_from_array(x_ND, tmp_path / "c", 0.1, shard_rows=64, outlier_factor=None)
    assert "outliers" not in ActivationCache(out).meta and ActivationCache(out).keep("train").all()
    assert KeptRows(ActivationCache(out)).n_rows("train") == 360
    rec = flag_outliers(out)
    assert rec["splits"]["train"]["flagged"] == 3 and rec["splits"]["test"]["flagged"] == 2
    assert json.loads((out / "meta.json").read_text())["outliers"] == rec
    # another factor redoes the masks: 1.2 x the median flags many ordinary rows too
    assert flag_outliers(out, 1.2)["splits"]["train"]["flagged"] > 50
    with pytest.raises(SaeensError, match="above 1"):
        flag_outliers(out, 0.5)
    (out / "keep_00000.npy").write_bytes(b"junk")
    with pytest.raises(SaeensError, match="keep-mask .* damaged"):
        ActivationCache(out).keep("train")


def test_training_batches_come_from_kept_rows_only(tmp_path):
    x_ND, planted = _rows()
    acts = ActivationCache(cache_from_array(x_ND, tmp_path / "c", 0.1, shard_rows=64))
    src = CacheSource(acts)
    assert src.n_train == 357 and src.describe()["train_rows"] == 357
    seen = np.concatenate([src.batch(s, 51, seed=3) for s in range(7)])  # exactly one epoch of kept rows
    assert np.linalg.norm(seen, axis=1).max() < acts.meta["outliers"]["splits"]["train"]["threshold"]
    kept_ND = np.delete(x_ND[:360], planted[:3], axis=0)
    np.testing.assert_array_equal(np.sort(seen, axis=0), np.sort(kept_ND, axis=0))
    assert np.linalg.norm(src.init_sample(1000, 0), axis=1).max() < 100


def test_intrinsic_metrics_skip_flagged_rows(tmp_path):
    x_ND, planted = _rows()
    acts = ActivationCache(cache_from_array(x_ND, tmp_path / "c", 0.1, shard_rows=16))
    cfg = SAEConfig(d_in=D, width=12, arch="topk", k=3)
    ens = ensemble.single(cfg, sae.init(jax.random.key(0), cfg))
    test_kept = np.delete(x_ND[360:], planted[3:] - 360, axis=0)
    got = intrinsic.evaluate_ensemble(ens, acts, "test")
    want = intrinsic.evaluate_ensemble(ens, ArrayActivations(test_kept, 1.0), "test")
    for key in ("mse", "fvu", "l0"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, err_msg=key)
    unmasked = intrinsic.evaluate_ensemble(ens, ArrayActivations(x_ND[360:], 1.0), "test")
    assert unmasked["mse"] > 100 * got["mse"]  # the two massive rows would dominate it


def test_kept_view_maps_back_to_cache_rows_and_leaves_other_readers_alone(tmp_path):
    x_ND, planted = _rows()
    acts = ActivationCache(cache_from_array(x_ND, tmp_path / "c", 0.1, shard_rows=64))
    kept = kept_view(acts)
    assert isinstance(kept, KeptRows) and kept.n_rows("train") == 357
    np.testing.assert_array_equal(kept.original(np.array([0, 3, 4, -1]), "train"), [0, 4, 5, -1])
    np.testing.assert_array_equal(np.concatenate(list(kept.chunks("train", 50))), np.delete(x_ND[:360], planted[:3], 0))
    arr = ArrayActivations(x_ND)
    assert kept_view(arr) is arr


def test_feature_statistics_never_show_a_flagged_row(tmp_path):
    from saeens.features.analysis import FeaturesConfig, analyse

    x_ND, planted = _rows()
    acts = ActivationCache(cache_from_array(x_ND, tmp_path / "c", 0.1, shard_rows=64))
    cfg = SAEConfig(d_in=D, width=8, arch="relu")
    ens = ensemble.bagging(cfg, jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(jax.random.key(1), 2)))
    rec = analyse(ens, {"name": "r"}, acts, [], FeaturesConfig(split="train", top_n=5, chunk_rows=32), progress=False)
    assert rec["n_tokens"] == 357
    rows = {c["row"] for f in rec["features"] for c in f["contexts"] if "row" in c}
    assert rows and not rows & set(planted.tolist())
    # each shown row's value is that cache row's code (the kept index was mapped back)
    f = next(f for f in rec["features"] if f["contexts"])
    c = f["contexts"][0]
    code = ensemble.encode(ens, acts.gather(np.array([c["row"]]), "train"))[0, f["id"]]
    assert float(code) == pytest.approx(c["value"], rel=1e-4)


def test_spliced_loss_keeps_rows_above_the_threshold_clean(tiny_model):
    hook = "blocks.1.hook_resid_post"
    tokens = np.random.default_rng(1).integers(0, 97, (4, 12)).astype(np.int32)
    cfg = SAEConfig(d_in=8, width=12, arch="topk", k=3)
    ens = ensemble.single(cfg, sae.init(jax.random.key(2), cfg))
    _, cached = models.run_with_cache(tiny_model, tokens, [hook])
    norms = np.linalg.norm(np.asarray(cached[hook])[:, 1:], axis=-1)
    thr = float(np.median(norms))
    got = spliced_losses(tiny_model, ens, hook, tokens, batch_size=2, clean_above=thr)

    def fn(x):  # BOS and rows above thr keep their clean activation
        rec = ensemble.reconstruct(ens, x[:, 1:].reshape(-1, 8)).reshape(x.shape[0], -1, 8)
        flagged = jnp.linalg.norm(x[:, 1:], axis=-1, keepdims=True) > thr
        return x.at[:, 1:].set(jnp.where(flagged, x[:, 1:], rec))

    spliced = models.run_with_splice(tiny_model, tokens, hook, fn)
    want = float(np.mean(np.asarray(models.token_nll(spliced, tokens))))
    np.testing.assert_allclose(got["ce_loss_spliced"], want, rtol=1e-5)
    assert got["ce_loss_spliced"] != pytest.approx(spliced_losses(tiny_model, ens, hook, tokens, 2)["ce_loss_spliced"])
    none = spliced_losses(tiny_model, ens, hook, tokens, batch_size=2, clean_above=0.0)  # every row flagged
    assert none["delta_lm_loss"] == pytest.approx(0.0, abs=1e-6) and none["kl_div"] == pytest.approx(0.0, abs=1e-6)
    base = baseline_losses(tiny_model, hook, tokens, 2, clean_above=0.0)
    assert base["ce_loss_zero_ablation"] == pytest.approx(base["ce_loss_clean"], abs=1e-6)
    assert outlier_threshold({"outliers": {"splits": {"test": {"threshold": 5.0}}}}) == 5.0
    assert outlier_threshold({}) is None


def _planted_stream(split, factor=10.0):
    """A stream whose model returns a fixed vector per token id, x200 for the letter 'Q' (the only
    massive rows), over documents that hold a few Qs."""
    from saeens.data.corpora import Document
    from saeens.data.stream import open_stream
    from saeens.data.tokens import byte_tokenizer

    tok = byte_tokenizer()
    q = tok.convert_tokens_to_ids("Q")
    table_VD = np.random.default_rng(0).standard_normal((257, D)).astype(np.float32)
    table_VD[q] *= 200.0

    def acts_fn(tokens_BT):
        return table_VD[np.asarray(tokens_BT)]

    rng = np.random.default_rng(1)
    docs = [Document("".join(rng.choice(list("abcdefgh Q"), size=60, p=[0.11] * 8 + [0.1, 0.02])), "x", f"d{i}")
            for i in range(20)]
    return open_stream(acts_fn, tok, docs, split=split, context_length=16, buffer_contexts=4, model_batch=4,
                       outlier_factor=factor), table_VD[q]


def test_the_model_stream_applies_the_same_rule():
    train, q_row = _planted_stream("train")
    thr = train.describe()["outlier_threshold"]
    assert train.describe()["outlier_factor"] == 10.0 and np.linalg.norm(q_row) > thr
    batches = np.concatenate([train.batch(s, 64, seed=0) for s in range(6)])
    assert len(batches) == 384 and np.linalg.norm(batches, axis=1).max() <= thr  # each Q row replaced
    unruled, _ = _planted_stream("train", factor=None)
    raw = np.concatenate([unruled.batch(s, 64, seed=0) for s in range(6)])
    assert np.linalg.norm(raw, axis=1).max() > thr  # the same batches hold Q rows without the rule
    replaced = np.linalg.norm(raw, axis=1) > thr
    np.testing.assert_array_equal(batches[~replaced], raw[~replaced])
    held, _ = _planted_stream("test")
    rows = np.concatenate(list(held.chunks("test")))
    all_rows = np.concatenate(list(_planted_stream("test", factor=None)[0].chunks("test")))
    n_q = int((np.linalg.norm(all_rows, axis=1) > held.meta["outlier_threshold"]).sum())
    assert n_q > 0 and len(rows) == len(all_rows) - n_q
    assert outlier_threshold(held.meta) == held.meta["outlier_threshold"]


def test_saeens_cache_records_the_outlier_factor(tmp_path):
    from saeens.cli import main

    x_ND, _ = _rows()
    np.save(tmp_path / "x.npy", x_ND)
    assert main(["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "a"), "--outlier-factor", "20"]) == 0
    assert ActivationCache(tmp_path / "a").meta["outliers"]["factor"] == 20.0
    assert main(["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "b"), "--outlier-factor", "0"]) == 0
    assert "outliers" not in ActivationCache(tmp_path / "b").meta and not list((tmp_path / "b").glob("keep_*"))
    assert main(["cache", "--from-npy", str(tmp_path / "x.npy"), "--out", str(tmp_path / "c"), "--outlier-factor", "0.5"]) == 2
    assert not (tmp_path / "c").exists()  # refused before anything was written
