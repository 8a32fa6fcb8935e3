"""Sparse probing: latent selection, pooling (BOS and padding skipped) against a NumPy reference on
a tiny model, the end-to-end eval, and the labelled datasets (local corpora and hub-format files)."""

import jax
import numpy as np
import pytest

from saeens import ensemble, models, sae
from saeens.config import SAEConfig
from saeens.data import labelled
from saeens.data.corpora import Document
from saeens.data.labelled import LabelledDataset, hub_probing_dataset, probing_dataset
from saeens.data.tokens import byte_tokenizer
from saeens.errors import SaeensError
from saeens.evals.probing import (
    ProbingConfig, balanced_indices, correct_from_bits, correct_to_bits, pooled, pooled_codes, run_probing, sparse_probe,
    sparse_probe_correct, tokenize_texts, top_k_latents,
)

HOOK = "blocks.0.hook_resid_post"


def test_top_k_matches_hand_computed_selection():
    codes = np.array([[1.0, 0.0, 5.0, 2.0],
                      [3.0, 0.0, 5.0, 2.0],
                      [0.0, 1.0, 2.0, 0.0],
                      [0.0, 3.0, 0.0, 2.0]])
    y = np.array([1, 1, 0, 0], bool)
    # mean_pos = [2, 0, 5, 2], mean_neg = [0, 2, 1, 1]: |diff| = [2, 2, 4, 1] -> 2, then 0 and 1 (tie: lower index)
    assert top_k_latents(codes, y, 1).tolist() == [2]
    assert top_k_latents(codes, y, 3).tolist() == [2, 0, 1]


def test_sparse_probe_finds_the_latent_that_encodes_the_label():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    codes = rng.exponential(1.0, (400, 30)) * (rng.random((400, 30)) < 0.4)
    codes[:, 7] = 2.0 * y + 0.2 * rng.random(400)
    assert top_k_latents(codes[:300], y[:300], 1).tolist() == [7]
    assert sparse_probe(codes[:300], y[:300], codes[300:], y[300:], 1) == 1.0
    noisy = codes + 3.0 * rng.random(codes.shape)  # per document: right or wrong, its mean the accuracy
    right = sparse_probe_correct(noisy[:300], y[:300], noisy[300:], y[300:], 1)
    assert right.dtype == bool and right.shape == (100,) and 0 < right.sum() < 100
    assert right.mean() == sparse_probe(noisy[:300], y[:300], noisy[300:], y[300:], 1)
    idx = balanced_indices(y, np.random.default_rng(1))
    assert y[idx].sum() == (~y[idx]).sum() == min(y.sum(), (~y).sum()) and np.all(np.diff(idx) > 0)


def test_tokenize_puts_bos_first_truncates_and_masks():
    tok = byte_tokenizer()
    tokens, mask = tokenize_texts(tok, ["ab", "abcdefghijklmnopqrstuvwxyz", ""], context_length=20)
    assert tokens.shape == (3, 20)  # the longest row (BOS + 26 bytes) is cut at the context length
    assert (tokens[:, 0] == tok.bos_token_id).all()
    assert mask.sum(1).tolist() == [3, 20, 1]
    assert tok.decode(tokens[1, 1:20]) == "abcdefghijklmnopqrs"
    assert tokenize_texts(tok, ["ab", "abc"], context_length=128)[0].shape == (2, 16)  # padded to a multiple of 16
    assert tok.decode(tokens[0, 1:3]) == "ab"


def test_pooling_skips_bos_and_padding_exactly(tiny_model, tiny_bagging):
    rng = np.random.default_rng(3)
    tok = rng.integers(0, 257, (5, 16)).astype(np.int32)
    lengths = np.array([16, 4, 7, 2, 1])  # the last row is BOS only: pooled to zeros
    mask = np.arange(16)[None] < lengths[:, None]
    out = pooled(tiny_model, tiny_bagging, HOOK, tok, mask, batch_size=8)
    acts = np.asarray(models.run_to_hook(tiny_model, tok, HOOK), np.float64)  # the model's own [N, T, D]
    W_enc, b_enc = np.asarray(tiny_bagging.params["W_enc"], np.float64), np.asarray(tiny_bagging.params["b_enc"], np.float64)
    b_dec = np.asarray(tiny_bagging.params["b_dec"], np.float64)
    for n, L in enumerate(lengths):
        a = acts[n, 1:L]  # skip BOS and padding
        # relu members, weights 1/2: codes = [relu((a - b_dec_j) W_enc_j + b_enc_j) / 2 for j]
        codes = np.concatenate([np.maximum((a - b_dec[j]) @ W_enc[j] + b_enc[j], 0) / 2 for j in range(2)], 1)
        ref_acts = a.mean(0) if L > 1 else np.zeros(8)
        ref_codes = codes.mean(0) if L > 1 else np.zeros(24)
        np.testing.assert_allclose(out["acts"][n], ref_acts, atol=1e-5)
        np.testing.assert_allclose(out["codes"][n], ref_codes, atol=1e-5)
    # padding tokens never matter; neither does the batch size
    tok2 = np.where(mask, tok, 5)
    np.testing.assert_allclose(pooled_codes(tiny_model, tiny_bagging, HOOK, tok2, mask, batch_size=8), out["codes"], atol=1e-6)
    with pytest.raises(SaeensError, match="d_in"):
        pooled(tiny_model, ensemble.single(SAEConfig(d_in=6, width=4, arch="relu"),
                                      sae.init(jax.random.key(0), SAEConfig(d_in=6, width=4, arch="relu"))),
               HOOK, tok, mask)


def test_run_probing_end_to_end_on_a_tiny_model(tiny_model, tiny_bagging):
    docs = [Document(f"{w} number {i}", c, f"{c}{i}") for c, w in (("a", "apples"), ("b", "zebras"), ("c", "mmmm"))
            for i in range(12)]
    ds = LabelledDataset("tiny", ("a", "b", "c"), tuple(d for d in docs if int(d.doc_id[1:]) < 8),
                         tuple(d for d in docs if int(d.doc_id[1:]) >= 8))
    cfg = ProbingConfig(ks=(1, 2), context_length=16, batch_size=8, max_train_per_class=6)
    res = run_probing(tiny_model, byte_tokenizer(), tiny_bagging, HOOK, ds, cfg)
    assert [t.positive_class for t in res.tasks] == ["a", "b", "c"]  # one-vs-rest
    assert all(t.n_train == 12 and t.n_test == 8 for t in res.tasks)  # balanced: 6 vs 6 of the rest; 4 vs 4
    assert res.counts["train"] == {"a": 6, "b": 6, "c": 6}
    d = res.to_dict()
    assert {"llm_test_accuracy", "sae_top_1_test_accuracy", "sae_top_2_test_accuracy"} <= set(d)
    assert all(0 <= v <= 1 for k, v in d.items() if k.endswith("accuracy"))
    for t in d["tasks"]:  # each test document's correctness: the accuracy, and paired comparisons
        bits = t["sae_test_correct"]
        assert set(bits) == {"1", "2"} and all(len(b) == 8 and set(b) <= {"0", "1"} for b in bits.values())
        assert all(b.count("1") / 8 == t["sae_test_accuracy"][k] for k, b in bits.items())
        assert all(correct_to_bits(correct_from_bits(b).astype(bool)) == b for b in bits.values())
    binary = LabelledDataset("bin", ("a", "b"), tuple(d for d in ds.train if d.label != "c"),
                             tuple(d for d in ds.test if d.label != "c"))
    assert [t.positive_class for t in run_probing(tiny_model, byte_tokenizer(), tiny_bagging, HOOK, binary, cfg).tasks] == ["b"]


def _check_split(ds: LabelledDataset):
    tr, te = {d.doc_id for d in ds.train}, {d.doc_id for d in ds.test}
    assert len(tr) == len(ds.train) and len(te) == len(ds.test) and not tr & te
    assert {d.label for d in ds.train} == {d.label for d in ds.test} == set(ds.classes)


def test_local_probing_datasets_counts_labels_and_splits():
    bbc = probing_dataset("bbc-topic")
    assert sum(sum(c.values()) for c in bbc.counts().values()) == 2225
    assert 0.15 < len(bbc.test) / 2225 < 0.25
    _check_split(bbc)
    assert probing_dataset("bbc-topic") == bbc and probing_dataset("bbc-topic", seed=1) != bbc  # deterministic
    tw = probing_dataset("tweet-sentiment")
    assert tw.classes == ("negative", "positive") and len(tw.train) + len(tw.test) == 15965 + 6823
    _check_split(tw)
    sh = probing_dataset("shakespeare-genre")
    _check_split(sh)
    play = lambda d: d.doc_id.split("/")[1]  # noqa: E731
    assert not {play(d) for d in sh.train} & {play(d) for d in sh.test}  # split by play
    assert {play(d) for d in sh.train + sh.test} == set(labelled.FIRST_FOLIO) and len(labelled.FIRST_FOLIO) == 36
    src = probing_dataset("text-source")
    _check_split(src)
    assert all(sum(c[k] for c in src.counts().values()) == 780 for k in src.classes)
    small = bbc.subsample(10, 3)
    assert small.counts()["train"] == dict.fromkeys(bbc.classes, 10) and small.counts()["test"] == dict.fromkeys(bbc.classes, 3)
    assert set(bbc.subsample(5, 3).train) <= set(small.train)  # nested as the cap grows


def test_hub_format_local_files_load_offline(tmp_path):
    import datasets

    path = str(tmp_path / "ag.jsonl")
    datasets.Dataset.from_dict({"text": [f"news item {i}" for i in range(60)], "label": [i % 4 for i in range(60)]}).to_json(path)
    ag = hub_probing_dataset("fancyzhx/ag_news", data_files=path)
    assert ag.classes == ("Business", "Sci/Tech", "Sports", "World")
    _check_split(ag)
    assert len(ag.train) + len(ag.test) == 60 and hub_probing_dataset("fancyzhx/ag_news", data_files=path) == ag
    amz = str(tmp_path / "amazon.parquet")
    datasets.Dataset.from_dict({"title": ["t"] * 20, "content": [f"review {i}" for i in range(20)],
                                "label": [i % 2 for i in range(20)]}).to_parquet(amz)
    pol = probing_dataset("fancyzhx/amazon_polarity", data_files=amz, classes=("negative", "positive"))
    assert pol.classes == ("negative", "positive") and len(pol.train) + len(pol.test) == 20
    with pytest.raises(SaeensError, match="hub datasets only"):
        probing_dataset("bbc-topic", data_files=amz)
