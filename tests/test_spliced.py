"""Spliced LM loss against a direct computation with the model's own splice, and exact SAEs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from saeens import ensemble, models, sae
from saeens.config import SAEConfig
from saeens.errors import SaeensError
from saeens.evals.spliced import baseline_losses, spliced_losses

HOOK = "blocks.1.hook_resid_post"


TOKENS = np.random.default_rng(1).integers(0, 97, (5, 12)).astype(np.int32)


def _nll(logits, tokens):
    return float(jnp.mean(models.token_nll(logits, jnp.asarray(tokens))))


def test_matches_direct_splice(tiny_model):
    cfg = SAEConfig(d_in=8, width=12, arch="topk", k=3)
    params = jax.vmap(lambda k: sae.init(k, cfg))(jax.random.split(jax.random.key(0), 3))
    for ens in (ensemble.bagging(cfg, params), ensemble.boosting(cfg, params)):
        out = spliced_losses(tiny_model, ens, HOOK, TOKENS, batch_size=2)

        def fn(x):  # BOS keeps its clean activation
            return x.at[:, 1:].set(ensemble.reconstruct(ens, x[:, 1:].reshape(-1, 8)).reshape(x.shape[0], -1, 8))

        clean = models.logits(tiny_model, TOKENS)
        spliced = models.run_with_splice(tiny_model, TOKENS, HOOK, fn)
        zero = models.run_with_splice(tiny_model, TOKENS, HOOK, lambda x: x.at[:, 1:].set(0.0))
        np.testing.assert_allclose(out["ce_loss_clean"], _nll(clean, TOKENS), rtol=1e-5)
        np.testing.assert_allclose(out["ce_loss_spliced"], _nll(spliced, TOKENS), rtol=1e-5)
        np.testing.assert_allclose(out["ce_loss_zero_ablation"], _nll(zero, TOKENS), rtol=1e-5)
        p, q = jax.nn.log_softmax(clean[:, :-1]), jax.nn.log_softmax(spliced[:, :-1])
        np.testing.assert_allclose(out["kl_div"], float(jnp.mean(jnp.sum(jnp.exp(p) * (p - q), -1))), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["delta_lm_loss"], out["ce_loss_spliced"] - out["ce_loss_clean"], rtol=1e-6)
        expected = (out["ce_loss_zero_ablation"] - out["ce_loss_spliced"]) / (out["ce_loss_zero_ablation"] - out["ce_loss_clean"])
        np.testing.assert_allclose(out["loss_recovered"], expected, rtol=1e-6)


def test_baseline_path_equals_full(tiny_model):
    """Clean and zero-ablation computed once and reused give the same losses as the full pass."""
    cfg = SAEConfig(d_in=8, width=12, arch="topk", k=3)
    ens = ensemble.single(cfg, sae.init(jax.random.key(2), cfg))
    full = spliced_losses(tiny_model, ens, HOOK, TOKENS, batch_size=2)
    base = baseline_losses(tiny_model, HOOK, TOKENS, batch_size=2)
    fast = spliced_losses(tiny_model, ens, HOOK, TOKENS, batch_size=2, baseline=base)
    assert set(full) - set(fast) == {"kl_div"}
    for key, value in fast.items():
        np.testing.assert_allclose(value, full[key], rtol=1e-5)
    with pytest.raises(SaeensError, match="other contexts"):
        spliced_losses(tiny_model, ens, HOOK, TOKENS[:2], baseline=base)


def test_exact_sae_recovers_all_loss(tiny_model):
    """relu(x) - relu(-x) = x: an SAE with features +-e_i reconstructs exactly."""
    cfg = SAEConfig(d_in=8, width=16, arch="relu")
    eye = jnp.eye(8)
    params = {"W_enc": jnp.concatenate([eye, -eye], 1), "b_enc": jnp.zeros(16), "W_dec": jnp.concatenate([eye, -eye], 0),
              "b_dec": jnp.zeros(8)}
    out = spliced_losses(tiny_model, ensemble.single(cfg, params), HOOK, TOKENS)
    assert abs(out["delta_lm_loss"]) < 1e-5 and abs(out["kl_div"]) < 1e-5
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


def test_bad_inputs(tiny_model):
    cfg = SAEConfig(d_in=6, width=12, arch="topk", k=3)
    ens = ensemble.single(cfg, sae.init(jax.random.key(0), cfg))
    with pytest.raises(SaeensError, match="d_in=6"):
        spliced_losses(tiny_model, ens, HOOK, TOKENS)
    with pytest.raises(SaeensError):
        spliced_losses(tiny_model, ens, "blocks.9.hook_resid_post", TOKENS)


def test_held_out_contexts_are_test_documents_of_a_mixture(tmp_path):
    """Only the cache's test-split documents (its seed, test fraction and context length, read from
    meta.json), every corpus of a mixture represented, deterministic; other documents are refused."""
    from test_extract import fake_acts_fn

    from saeens.data import ActivationCache, cache_documents, held_out_contexts
    from saeens.data.corpora import Document, split_documents
    from saeens.data.tokens import byte_tokenizer

    docs = [Document(f"{src}{i:03d}" * 4, None, f"{src}-{i}") for src in "ab" for i in range(200)]
    tok = byte_tokenizer()
    acts = ActivationCache(cache_documents(fake_acts_fn, tok, docs, 200, tmp_path / "acts", context_length=40,
                                           test_fraction=0.2, seed=3, progress=False))
    ctx = held_out_contexts(acts, tok, 6, docs)
    assert ctx.shape == (6, 40)
    np.testing.assert_array_equal(ctx, held_out_contexts(acts, tok, 6, docs))
    with pytest.raises(SaeensError, match="not the ones the cache"):
        held_out_contexts(acts, tok, 6, docs[:-1])
    with pytest.raises(SaeensError, match="does not record a named dataset: pass --dataset"):
        held_out_contexts(acts, tok, 6)  # built from a list of documents, not a corpus name
    train, test = split_documents(docs, 0.2, 3)
    rows = [tok.decode([int(t) for t in row if t != 0]) for row in ctx]
    whole = [d for d in docs if any(d.text in r for r in rows)]  # documents that fit whole in a row
    assert whole and all(d in test for d in whole) and not any(d.text in r for d in train for r in rows)
    assert {"a", "b"} <= set("".join(rows))  # the corpus listed second is sampled too


def test_saeens_evaluate_with_a_model_through_the_cli(tiny_model, tmp_path, monkeypatch):
    """`saeens cache` + `train` + `evaluate --model`: the spliced losses are those of the cache's own
    held-out contexts (its seed, test fraction and context length, none of them the defaults)."""
    import json

    from saeens.cli import main
    from saeens.data import byte_tokenizer, load_corpus, pack_documents, split_documents
    from saeens.train import load_ensemble

    tok = byte_tokenizer()
    monkeypatch.setattr(models, "load_model", lambda name: (tiny_model, tok))
    acts, run, out = tmp_path / "acts", tmp_path / "run", tmp_path / "eval.json"
    assert main(["cache", "--model", "tiny", "--layer", "1", "--dataset", "bbc-news", "--tokens", "600",
                 "--context-length", "16", "--test-fraction", "0.3", "--seed", "4", "--out", str(acts)]) == 0
    assert main(["train", "--activations", str(acts), "--out", str(run), "--method", "boosting", "--members", "2",
                 "--arch", "relu", "--width", "12", "--tokens", "512", "--batch-size", "64", "--quiet"]) == 0
    assert main(["evaluate", str(run), "--activations", str(acts), "--model", "tiny", "--json", str(out), "--quiet"]) == 0
    got = json.loads(out.read_text())

    _, test = split_documents(load_corpus("bbc-news"), 0.3, 4)
    order = np.random.default_rng(4).permutation(len(test))
    contexts = pack_documents([test[i] for i in order], tok, 16, max_contexts=64).tokens_NT
    assert contexts.shape == (64, 16)
    want = spliced_losses(tiny_model, load_ensemble(run)[0], HOOK, contexts)
    assert got["hook"] == HOOK and got["spliced_tokens"] == 64 * 15
    for key in ("ce_loss_clean", "ce_loss_spliced", "ce_loss_zero_ablation", "delta_lm_loss", "loss_recovered", "kl_div"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert "explained_variance" in got  # the intrinsic metrics come along
