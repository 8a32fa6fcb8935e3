"""Packing (BOS first, order kept, streamed) and extraction into the activation cache: exact rows,
token ids, the recorded layout (row -> context, position, document), split hygiene and errors."""

import json

import numpy as np
import pytest

from saeens.data import ActivationCache, Document, byte_tokenizer, load_corpus
from saeens.data.build import cache_documents
from saeens.data.extract import extract_to_cache
from saeens.data.tokens import iter_document_tokens, iter_packed, pack_documents
from saeens.errors import SaeensError

D = 8
BOS = 0


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def bbc():
    return load_corpus("bbc-news")


_E_VD = np.random.default_rng(0).normal(size=(257, D)).astype(np.float32)


def fake_acts_fn(tokens_BT):
    """Embedding lookup with the position written into channel 0: every row says where it came from."""
    tokens_BT = np.asarray(tokens_BT)
    acts = _E_VD[tokens_BT].copy()
    acts[..., 0] = np.arange(tokens_BT.shape[1])[None, :]
    return acts


def docs_of(texts):
    return [Document(t, None, f"d{i}") for i, t in enumerate(texts)]


# ----------------------------------------------------------------------------- packing


def test_packing_separates_documents_with_bos_like_saelens(tok):
    p = pack_documents(docs_of(["abc", "defghij", "", "klm"]), tok, 5)
    ids = lambda s: list(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    assert p.tokens_NT.tolist() == [
        [BOS, *ids("abc"), BOS],   # a separator BOS between documents ...
        [BOS, *ids("defg")],       # ... none where a document starts a context
        [BOS, *ids("hij"), BOS],   # a long document continues after the next context's BOS
    ]  # the final incomplete context ("klm") is dropped
    assert p.doc_index_N.tolist() == [0, 1, 1] and p.doc_offset_N.tolist() == [0, 0, 4]
    assert p.tokens_NT.dtype == np.int32


def test_packing_puts_bos_first_and_keeps_token_order(tok, bbc):
    docs = bbc[:40]
    T = 64
    p = pack_documents(docs, tok, T)
    assert p.tokens_NT.shape[1] == T and (p.tokens_NT[:, 0] == BOS).all()
    body = p.tokens_NT[:, 1:].reshape(-1)
    stream = np.concatenate(list(iter_document_tokens(docs, tok)))
    assert not (stream == BOS).any()
    kept = body[body != BOS]
    np.testing.assert_array_equal(kept, stream[: kept.size])  # nothing lost, reordered or repeated
    assert stream.size - kept.size < T  # only the last incomplete context is dropped
    doc_tokens = list(iter_document_tokens(docs, tok))
    for n in range(len(p)):  # position 1 is token doc_offset of document doc_index
        assert p.tokens_NT[n, 1] == doc_tokens[p.doc_index_N[n]][p.doc_offset_N[n]]
    # streaming in batches gives the same contexts; max_contexts stops early
    streamed = list(iter_packed(docs, tok, T, batch_size=7))
    assert all(len(b) == 7 for b in streamed[:-1])
    np.testing.assert_array_equal(np.concatenate([b.tokens_NT for b in streamed]), p.tokens_NT)
    assert len(pack_documents(docs, tok, T, max_contexts=5)) == 5


def test_packing_is_lazy(tok, bbc):
    consumed = []

    def gen():
        for d in bbc:
            consumed.append(d.doc_id)
            yield d

    first = next(iter_packed(gen(), tok, 32, batch_size=4))
    assert len(first) == 4 and len(consumed) <= 64  # one tokenisation group, not the corpus


# ----------------------------------------------------------------------------- extraction


def test_cache_rows_tokens_and_layout_are_exact(tok, bbc, tmp_path):
    T, n_tokens = 32, 1000  # 1000 = 32 full contexts of 31 rows + 8 rows of a 33rd
    calls = []

    def acts_fn(t):
        calls.append(t.shape)
        return fake_acts_fn(t)

    out = cache_documents(acts_fn, tok, bbc[:300], n_tokens, tmp_path / "acts", context_length=T, batch_size=8,
                          test_fraction=0.2, seed=3, shard_rows=300, progress=False)
    cache = ActivationCache(out)
    meta = cache.meta
    n_test = round(n_tokens * 0.2 / 0.8)
    assert cache.n_rows("train") == n_tokens and cache.n_rows("test") == n_test
    assert meta["complete"] and meta["bos_dropped"] and meta["rows_per_context"] == T - 1
    assert meta["context_length"] == T and meta["dataset"] == "documents" and meta["tokenizer"] == "saeens-byte-tokenizer"
    assert all(shape[0] == 8 for shape in calls[1:])  # one batch shape: a jitted model compiles once
    assert len(cache.shards("train")) == 4  # shards of 300 rows were written as it went

    by_id = {d.doc_id: d for d in bbc[:300]}
    split_ids = {}
    for split, n in (("train", n_tokens), ("test", n_test)):
        listed = json.loads((out / meta["splits"][split]["documents_file"]).read_text())
        split_ids[split] = {e["doc_id"] for e in listed}
        docs = [by_id[e["doc_id"]] for e in listed]
        ctx = np.load(out / meta["splits"][split]["contexts_file"])
        n_ctx = -(-n // (T - 1))
        assert ctx.shape == (n_ctx, 2) and meta["splits"][split]["contexts"] == n_ctx
        # re-packing the listed documents reproduces every row's token: row r = (r // (T-1), 1 + r % (T-1))
        packed = pack_documents(docs, tok, T, max_contexts=n_ctx)
        np.testing.assert_array_equal(ctx, np.stack([packed.doc_index_N, packed.doc_offset_N], 1))
        r = np.arange(n)
        expect_tok = packed.tokens_NT[r // (T - 1), 1 + r % (T - 1)]
        np.testing.assert_array_equal(cache.tokens(split), expect_tok)
        acts = cache.gather(r, split)
        np.testing.assert_array_equal(acts[:, 0], 1 + r % (T - 1))  # position channel: BOS rows are gone
        np.testing.assert_array_equal(acts[:, 1:], _E_VD[expect_tok][:, 1:])
    assert split_ids["train"] and split_ids["test"] and not split_ids["train"] & split_ids["test"]


def test_extract_from_an_array_and_row_limit(tmp_path):
    ctx_NT = np.random.default_rng(1).integers(1, 257, size=(10, 6)).astype(np.int32)
    ctx_NT[:, 0] = BOS
    n = extract_to_cache(fake_acts_fn, ctx_NT, tmp_path / "a", n_rows=23, batch_size=4, progress=False,
                         meta={"model": "fake"})
    cache = ActivationCache(tmp_path / "a")
    assert n == 23 and cache.n_rows("train") == 23 and cache.meta["model"] == "fake"
    np.testing.assert_array_equal(cache.tokens("train"), ctx_NT[:, 1:].reshape(-1)[:23])
    assert np.load(tmp_path / "a" / "contexts_train.npy").shape == (5, 2)  # 23 rows touch 5 contexts of 5


def test_bfloat16_activations_are_cached_as_float32(tmp_path):
    import jax.numpy as jnp

    ctx_NT = np.arange(1, 13, dtype=np.int32).reshape(3, 4)
    ctx_NT[:, 0] = BOS
    extract_to_cache(lambda t: jnp.asarray(fake_acts_fn(t), jnp.bfloat16), ctx_NT, tmp_path / "bf", progress=False)
    got = ActivationCache(tmp_path / "bf").gather(np.arange(9))
    want = np.asarray(jnp.asarray(fake_acts_fn(ctx_NT), jnp.bfloat16), np.float32)[:, 1:].reshape(-1, D)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_nan_activations_name_the_row(tmp_path):
    ctx_NT = np.ones((6, 5), np.int32)
    ctx_NT[:, 0] = BOS

    def bad(t):
        a = fake_acts_fn(t)
        a[3, 2, 4] = np.nan  # context 3, position 2 -> row 3 * 4 + 1 = 13
        return a

    with pytest.raises(SaeensError, match=r"row 13 \(context 3, position 2, token 1\) holds NaN/Inf") as e:
        extract_to_cache(bad, ctx_NT, tmp_path / "nan", batch_size=6, progress=False)
    assert "\n" not in str(e.value)


def test_empty_or_too_short_corpus_and_used_out_dir_fail_in_one_line(tok, tmp_path):
    with pytest.raises(SaeensError, match="no documents"):
        cache_documents(fake_acts_fn, tok, [], 100, tmp_path / "e1", progress=False)
    with pytest.raises(SaeensError, match="no full context"):
        cache_documents(fake_acts_fn, tok, docs_of(["hi", "yo"]), 100, tmp_path / "e2", progress=False)
    with pytest.raises(SaeensError, match="no train contexts"):
        extract_to_cache(fake_acts_fn, np.zeros((0, 8), np.int32), tmp_path / "e3", progress=False)
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("keep me")
    with pytest.raises(SaeensError, match="not empty"):
        cache_documents(fake_acts_fn, tok, docs_of(["a" * 500]), 100, tmp_path / "used", progress=False)
    assert (tmp_path / "used" / "x").read_text() == "keep me"


def test_small_corpus_warns_and_keeps_a_complete_cache(tok, tmp_path):
    docs = docs_of(["x" * 200 + str(i) for i in range(20)])
    with pytest.warns(UserWarning, match="gave only"):
        out = cache_documents(fake_acts_fn, tok, docs, 10**6, tmp_path / "s", context_length=16, progress=False)
    cache = ActivationCache(out)
    assert cache.meta["complete"] and 0 < cache.n_rows("train") < 10**6 and cache.meta["n_tokens_requested"] == 10**6


# ----------------------------------------------------------------------------- with a real (tiny) model


def test_build_cache_end_to_end_with_a_tiny_random_model(tok, bbc, tmp_path, monkeypatch):
    from saeens import models
    import jax
    from flax import nnx

    from saeens.data import build

    cfg = models.ModelConfig(family="llama", vocab_size=257, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1,
                             d_head=8, d_mlp=32, max_positions=64, name="tiny")
    # random weights from numpy (nnx's own init compiles one program per weight shape: slow on CPU)
    abstract = nnx.eval_shape(lambda: models.Transformer(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(np.float32),
                          nnx.to_pure_dict(nnx.split(abstract)[1]))
    model = models.build_model(cfg, params)
    monkeypatch.setattr(models, "load_model", lambda name: (model, tok))
    with pytest.raises(SaeensError, match="layer 3 but the model has 3 layers"):
        build.build_cache("tiny", 3, "resid_post", bbc[:60], 500, tmp_path / "bad", progress=False)
    out = build.build_cache("tiny", 1, "resid_post", bbc[:60], 500, tmp_path / "m", context_length=16,
                              batch_size=4, progress=False)
    cache = ActivationCache(out)
    meta = cache.meta
    assert meta["hook"] == "blocks.1.hook_resid_post" and meta["layer"] == 1 and meta["d_in"] == 16
    assert meta["model"] == "tiny" and cache.n_rows("train") == 500 and cache.n_rows("test") == 56
    # the cached rows are the model's activations at the hook, BOS position dropped
    listed = [e["doc_id"] for e in json.loads((out / "documents_train.json").read_text())]
    by_id = {d.doc_id: d for d in bbc[:60]}
    ctx = pack_documents([by_id[i] for i in listed], tok, 16, max_contexts=4)
    want = np.asarray(models.run_to_hook(model, ctx.tokens_NT, "blocks.1.hook_resid_post"))[:, 1:].reshape(-1, 16)
    np.testing.assert_allclose(cache.gather(np.arange(60)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.tokens("train")[:60], ctx.tokens_NT[:, 1:].reshape(-1))
