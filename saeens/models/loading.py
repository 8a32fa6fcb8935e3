"""Weights from disk, no network: HF-style directories (config.json + safetensors); GGUF files are gguf.py's.

Each format becomes a nested dict of arrays in OUR layout ({"blocks": {0: {"attn": {"W_q_DHK": ..}}}}),
which `build_model` checks against the abstract model (names and shapes) before filling it, so a
wrong mapping fails loudly at load time rather than giving silently wrong logits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import jax.numpy as jnp
from flax import nnx

from saeens.errors import SaeensError
from saeens.models.config import ModelConfig, from_hf_config
from saeens.models.transformer import Transformer

Getter = Callable[[str], Any]  # HF parameter name -> array in the HF [out, in] layout


# ----------------------------------------------------------------------------- building
def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    out: dict[tuple, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat: dict[tuple, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        node = tree
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = v
    return tree


def build_model(cfg: ModelConfig, params: dict, dtype=jnp.float32) -> Transformer:
    """A Transformer holding `params` (our layout), checked name by name and shape by shape."""
    graphdef, state = nnx.split(Transformer(cfg, rngs=None, dtype=dtype))  # shapes only
    want = _flatten(nnx.to_pure_dict(state))
    got = _flatten(params)
    name = lambda p: ".".join(map(str, p))  # noqa: E731
    missing = sorted(name(p) for p in want.keys() - got.keys())
    extra = sorted(name(p) for p in got.keys() - want.keys())
    if missing or extra:
        raise SaeensError(
            f"weights do not match the {cfg.family} model: missing {missing[:4]}, unexpected {extra[:4]}; "
            "check that the checkpoint and config.json belong together"
        )
    filled = {}
    for path, spec in want.items():
        arr = got[path]
        if tuple(arr.shape) != tuple(spec.shape):
            raise SaeensError(
                f"weight {name(path)} has shape {tuple(arr.shape)}, the config implies {tuple(spec.shape)}; "
                "check that the checkpoint and config.json belong together"
            )
        filled[path] = jnp.asarray(arr, dtype=dtype)
    nnx.replace_by_pure_dict(state, _unflatten(filled))
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- HF name mapping
def _t(w) -> Any:
    """torch Linear weight [out, in] -> [in, out]."""
    return w.T


def _hf_llama_like(cfg: ModelConfig, get: Getter) -> dict:
    """Llama, Mistral and Gemma 2 (same names; Gemma 2 adds pre/post feed-forward norms)."""
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    gemma = cfg.family == "gemma2"
    blocks = {}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        attn = {
            "W_q_DHK": _t(get(p + "self_attn.q_proj.weight")).reshape(D, H, K),
            "W_k_DGK": _t(get(p + "self_attn.k_proj.weight")).reshape(D, G, K),
            "W_v_DGK": _t(get(p + "self_attn.v_proj.weight")).reshape(D, G, K),
            "W_o_HKD": _t(get(p + "self_attn.o_proj.weight")).reshape(H, K, D),
        }
        if cfg.qkv_bias:
            attn["b_q_HK"] = get(p + "self_attn.q_proj.bias").reshape(H, K)
            attn["b_k_GK"] = get(p + "self_attn.k_proj.bias").reshape(G, K)
            attn["b_v_GK"] = get(p + "self_attn.v_proj.bias").reshape(G, K)
        if cfg.out_bias:
            attn["b_o_D"] = get(p + "self_attn.o_proj.bias")
        mlp = {
            "W_in_DF": _t(get(p + "mlp.up_proj.weight")),
            "W_gate_DF": _t(get(p + "mlp.gate_proj.weight")),
            "W_out_FD": _t(get(p + "mlp.down_proj.weight")),
        }
        if cfg.mlp_bias:
            mlp.update(
                b_in_F=get(p + "mlp.up_proj.bias"),
                b_gate_F=get(p + "mlp.gate_proj.bias"),
                b_out_D=get(p + "mlp.down_proj.bias"),
            )
        block = {"ln_attn": {"scale_D": get(p + "input_layernorm.weight")}, "attn": attn, "mlp": mlp}
        if gemma:
            block["ln_attn_post"] = {"scale_D": get(p + "post_attention_layernorm.weight")}
            block["ln_mlp"] = {"scale_D": get(p + "pre_feedforward_layernorm.weight")}
            block["ln_mlp_post"] = {"scale_D": get(p + "post_feedforward_layernorm.weight")}
        else:
            block["ln_mlp"] = {"scale_D": get(p + "post_attention_layernorm.weight")}
        blocks[i] = block
    out = {"W_E_VD": get("model.embed_tokens.weight"), "blocks": blocks, "ln_final": {"scale_D": get("model.norm.weight")}}
    if not cfg.tie_embeddings:
        out["W_U_DV"] = _t(get("lm_head.weight"))
    return out


def _hf_gpt_neox(cfg: ModelConfig, get: Getter) -> dict:
    """Pythia: fused query_key_value laid out per head as [H, (q|k|v), K]."""
    D, H, K = cfg.d_model, cfg.n_heads, cfg.d_head
    ln = lambda n: {"scale_D": get(n + ".weight"), "bias_D": get(n + ".bias")}  # noqa: E731
    blocks = {}
    for i in range(cfg.n_layers):
        p = f"gpt_neox.layers.{i}."
        w_HCKD = get(p + "attention.query_key_value.weight").reshape(H, 3, K, D)
        b_HCK = get(p + "attention.query_key_value.bias").reshape(H, 3, K)
        attn = {
            "W_q_DHK": w_HCKD[:, 0].transpose(2, 0, 1),
            "W_k_DGK": w_HCKD[:, 1].transpose(2, 0, 1),
            "W_v_DGK": w_HCKD[:, 2].transpose(2, 0, 1),
            "b_q_HK": b_HCK[:, 0],
            "b_k_GK": b_HCK[:, 1],
            "b_v_GK": b_HCK[:, 2],
            "W_o_HKD": _t(get(p + "attention.dense.weight")).reshape(H, K, D),
            "b_o_D": get(p + "attention.dense.bias"),
        }
        mlp = {
            "W_in_DF": _t(get(p + "mlp.dense_h_to_4h.weight")),
            "b_in_F": get(p + "mlp.dense_h_to_4h.bias"),
            "W_out_FD": _t(get(p + "mlp.dense_4h_to_h.weight")),
            "b_out_D": get(p + "mlp.dense_4h_to_h.bias"),
        }
        blocks[i] = {
            "ln_attn": ln(p + "input_layernorm"),
            "attn": attn,
            "ln_mlp": ln(p + "post_attention_layernorm"),
            "mlp": mlp,
        }
    out = {"W_E_VD": get("gpt_neox.embed_in.weight"), "blocks": blocks, "ln_final": ln("gpt_neox.final_layer_norm")}
    if not cfg.tie_embeddings:
        out["W_U_DV"] = _t(get("embed_out.weight"))
    return out


def _hf_gpt2(cfg: ModelConfig, get: Getter) -> dict:
    """GPT-2 uses Conv1D, whose weights are already [in, out]: no transpose, unlike nn.Linear."""
    D, H, K = cfg.d_model, cfg.n_heads, cfg.d_head
    ln = lambda n: {"scale_D": get(n + ".weight"), "bias_D": get(n + ".bias")}  # noqa: E731
    blocks = {}
    for i in range(cfg.n_layers):
        p = f"transformer.h.{i}."
        w_DCHK = get(p + "attn.c_attn.weight").reshape(D, 3, H, K)
        b_CHK = get(p + "attn.c_attn.bias").reshape(3, H, K)
        attn = {
            "W_q_DHK": w_DCHK[:, 0],
            "W_k_DGK": w_DCHK[:, 1],
            "W_v_DGK": w_DCHK[:, 2],
            "b_q_HK": b_CHK[0],
            "b_k_GK": b_CHK[1],
            "b_v_GK": b_CHK[2],
            "W_o_HKD": get(p + "attn.c_proj.weight").reshape(H, K, D),
            "b_o_D": get(p + "attn.c_proj.bias"),
        }
        mlp = {
            "W_in_DF": get(p + "mlp.c_fc.weight"),
            "b_in_F": get(p + "mlp.c_fc.bias"),
            "W_out_FD": get(p + "mlp.c_proj.weight"),
            "b_out_D": get(p + "mlp.c_proj.bias"),
        }
        blocks[i] = {"ln_attn": ln(p + "ln_1"), "attn": attn, "ln_mlp": ln(p + "ln_2"), "mlp": mlp}
    return {
        "W_E_VD": get("transformer.wte.weight"),
        "W_pos_PD": get("transformer.wpe.weight"),
        "blocks": blocks,
        "ln_final": ln("transformer.ln_f"),
    }


HF_MAPPERS: dict[str, Callable[[ModelConfig, Getter], dict]] = {
    "llama": _hf_llama_like,
    "gemma2": _hf_llama_like,
    "gpt_neox": _hf_gpt_neox,
    "gpt2": _hf_gpt2,
}


# ----------------------------------------------------------------------------- HF directories
def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SaeensError(
            f"no *.safetensors weights in {path}; save the model with save_pretrained(..., safe_serialization=True)"
        )
    return files


def _hf_getter(files: list[Path]) -> Getter:
    """Lazy tensor lookup across shards; accepts names with or without the top-level prefix
    (original GPT-2 checkpoints say `h.0...` where transformers says `transformer.h.0...`)."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="flax") as sf:
            for k in sf.keys():
                where[k] = f

    def get(name: str):
        for cand in (name, name.split(".", 1)[1] if "." in name else name, "model." + name):
            if cand in where:
                with safe_open(str(where[cand]), framework="flax") as sf:
                    return sf.get_tensor(cand).astype(jnp.float32)
        raise SaeensError(f"weight {name!r} not found in {files[0].parent}; the checkpoint does not match config.json")

    return get


def load_hf_dir(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Transformer, Any]:
    """(model, tokenizer or None) from a transformers `save_pretrained` directory."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise SaeensError(f"{path} has no config.json; pass a transformers save_pretrained directory or a .gguf file")
    hf = json.loads(cfg_file.read_text())
    cfg = from_hf_config(hf, name=path.name)
    params = HF_MAPPERS[cfg.family](cfg, _hf_getter(_safetensor_files(path)))
    model = build_model(cfg, params, dtype)
    return model, _hf_tokenizer(path)


def _hf_tokenizer(path: Path):
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any((path / n).exists() for n in names):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
