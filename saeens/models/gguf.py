"""Weights from a llama-architecture GGUF file (llama.cpp's format), dequantised to float32, and
its byte-level BPE tokenizer, offline; `loading.build_model` checks the result against the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from saeens.errors import SaeensError
from saeens.models.config import ModelConfig
from saeens.models.loading import build_model
from saeens.models.transformer import Transformer


def _unpermute_rope(w_OD: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rope pairs -> HF rotate-half halves)."""
    O, D = w_OD.shape
    K = O // n_heads
    return w_OD.reshape(n_heads, K // 2, 2, D).swapaxes(1, 2).reshape(O, D)


def load_gguf(path: str | os.PathLike, dtype=jnp.float32, with_tokenizer: bool = True) -> tuple[Transformer, Any]:
    """(model, tokenizer) from a llama-architecture GGUF file, dequantised to float32 first."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise SaeensError(f"GGUF file {path} does not exist; pass an existing .gguf path")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # corrupt or truncated file
        raise SaeensError(f"cannot read GGUF file {path} ({type(e).__name__}: {e}); re-download or reinstall it") from e

    def meta(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise SaeensError(
            f"GGUF architecture {arch!r} is not supported (only llama); load that model from an HF safetensors directory"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise SaeensError("GGUF with rope_freqs (Llama 3.1 rope scaling) is not supported; load the HF safetensors directory")

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise SaeensError(f"GGUF file {path.name} lacks tensor {name!r}; the file is incomplete or not a llama model")
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(w, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])

    d = int(meta("llama.embedding_length"))
    H = int(meta("llama.attention.head_count"))
    G = int(meta("llama.attention.head_count_kv", H))
    K = int(meta("llama.attention.key_length", d // H))
    n_layers = int(meta("llama.block_count"))
    W_E_VD = get("token_embd.weight")
    tied = "output.weight" not in tensors
    cfg = ModelConfig(
        family="llama",
        vocab_size=W_E_VD.shape[0],
        d_model=d,
        n_layers=n_layers,
        n_heads=H,
        n_kv_heads=G,
        d_head=K,
        d_mlp=int(meta("llama.feed_forward_length")),
        norm="rms",
        norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("llama.rope.freq_base", 10_000.0)),
        rotary_fraction=int(meta("llama.rope.dimension_count", K)) / K,
        max_positions=int(meta("llama.context_length", 2048)),
        tie_embeddings=tied,
        name=path.stem,
    )
    blocks = {}
    for i in range(n_layers):
        p = f"blk.{i}."
        blocks[i] = {
            "ln_attn": {"scale_D": get(p + "attn_norm.weight")},
            "attn": {
                "W_q_DHK": _unpermute_rope(get(p + "attn_q.weight"), H).T.reshape(d, H, K),
                "W_k_DGK": _unpermute_rope(get(p + "attn_k.weight"), G).T.reshape(d, G, K),
                "W_v_DGK": get(p + "attn_v.weight").T.reshape(d, G, K),
                "W_o_HKD": get(p + "attn_output.weight").T.reshape(H, K, d),
            },
            "ln_mlp": {"scale_D": get(p + "ffn_norm.weight")},
            "mlp": {
                "W_in_DF": get(p + "ffn_up.weight").T,
                "W_gate_DF": get(p + "ffn_gate.weight").T,
                "W_out_FD": get(p + "ffn_down.weight").T,
            },
        }
    params = {"W_E_VD": W_E_VD, "blocks": blocks, "ln_final": {"scale_D": get("output_norm.weight")}}
    if not tied:
        params["W_U_DV"] = get("output.weight").T
    model = build_model(cfg, params, dtype)
    return model, (gguf_tokenizer(reader) if with_tokenizer else None)


def gguf_tokenizer(reader) -> Any:
    """A transformers fast tokenizer built from a GGUF's byte-level BPE metadata, offline.

    (transformers' own `AutoTokenizer.from_pretrained(dir, gguf_file=...)` also works offline but
    parses the file twice more, ~3x slower; it also lacks llama.cpp's "smollm" pre-tokenizer, which
    is SmolLM2's: every digit alone, then GPT-2 byte level.)
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def meta(key: str, default=None):
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise SaeensError(f"GGUF tokenizer type {kind!r} is not supported (only byte-level BPE 'gpt2'); use an HF directory")
    tokens = meta("tokenizer.ggml.tokens")
    types = meta("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    tk = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(meta("tokenizer.ggml.add_space_prefix", False)))
    if meta("tokenizer.ggml.pre") == "smollm":
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]  # CONTROL
    tk.add_special_tokens(special)

    def tok_of(key: str):
        i = meta(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None else None

    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=tok_of("bos"),
        eos_token=tok_of("eos"),
        unk_token=tok_of("unknown"),
        pad_token=tok_of("padding"),
    )
