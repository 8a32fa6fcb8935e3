"""ModelConfig: every per-family difference of our four decoder families as one small, visible field.

The transformer code (transformer.py) has ONE block; it reads these fields instead of branching on
the family name, so a new Llama-like family is a new `from_hf_config` branch, not a new class.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

from saeens.errors import SaeensError

NormKind = Literal["rms", "rms_offset", "layer"]  # rms_offset: Gemma's x * (1 + w)
ActKind = Literal["silu", "gelu", "gelu_tanh", "relu"]
FAMILIES = ("llama", "gemma2", "gpt_neox", "gpt2")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of one decoder-only transformer; frozen (hashable) so jit can treat it as static."""

    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    # normalisation
    norm: NormKind = "rms"
    norm_eps: float = 1e-5
    post_norms: bool = False  # Gemma 2: extra norms on the attn / mlp outputs before the residual add
    # mlp
    act: ActKind = "silu"
    gated_mlp: bool = True  # SwiGLU / GeGLU: act(x W_gate) * (x W_in)
    mlp_bias: bool = False
    # attention
    qkv_bias: bool = False
    out_bias: bool = False
    query_scale: float | None = None  # None: 1/sqrt(d_head); Gemma 2: query_pre_attn_scalar ** -0.5
    attn_softcap: float | None = None  # logits -> cap * tanh(logits / cap)
    sliding_window: int | None = None
    layer_windows: tuple[bool, ...] = ()  # per layer: True = local sliding-window attention
    # positions
    positions: Literal["rope", "learned"] = "rope"
    rope_theta: float = 10_000.0
    rotary_fraction: float = 1.0  # GPT-NeoX rotary_pct: only the first fraction of each head rotates
    rope_llama3: tuple[float, float, float, int] | None = None  # (factor, low, high, original max pos)
    max_positions: int = 2048
    # residual layout and embeddings
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1 x) + mlp(ln2 x)
    embed_scale: float = 1.0  # Gemma: sqrt(d_model)
    tie_embeddings: bool = True
    final_softcap: float | None = None
    name: str = ""

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise SaeensError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; fix the model config"
            )
        if self.layer_windows and len(self.layer_windows) != self.n_layers:
            raise SaeensError(
                f"layer_windows has {len(self.layer_windows)} entries for {self.n_layers} layers; give one per layer"
            )

    @property
    def rotary_dim(self) -> int:
        """Rotated channels per head (even); GPT-NeoX rotates only int(d_head * rotary_pct)."""
        return int(self.d_head * self.rotary_fraction) // 2 * 2

    def is_local(self, layer: int) -> bool:
        return bool(self.layer_windows) and self.layer_windows[layer] and self.sliding_window is not None


def _rope_params(hf: dict[str, Any]) -> tuple[float, float, tuple[float, float, float, int] | None]:
    """(theta, partial fraction, llama3 scaling) from a transformers 4.x or 5.x config dict."""
    rp = hf.get("rope_parameters") or {}
    rs = hf.get("rope_scaling") or {}
    theta = rp.get("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10_000.0)))
    frac = rp.get("partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 1.0)))
    spec = rp if rp.get("rope_type", "default") != "default" else rs
    kind = spec.get("rope_type", spec.get("type", "default")) if spec else "default"
    llama3 = None
    if kind == "llama3":
        llama3 = (
            float(spec["factor"]),
            float(spec["low_freq_factor"]),
            float(spec["high_freq_factor"]),
            int(spec["original_max_position_embeddings"]),
        )
    elif kind not in ("default", None):
        raise SaeensError(f"rope scaling type {kind!r} is not supported; use a model with default or llama3 rope")
    return float(theta), float(frac), llama3


def _act(name: str) -> ActKind:
    table = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
        "relu": "relu",
    }
    if name not in table:
        raise SaeensError(f"activation {name!r} is not supported; supported: {', '.join(sorted(table))}")
    return table[name]  # type: ignore[return-value]


def from_hf_config(hf: dict[str, Any], name: str = "") -> ModelConfig:
    """Translate a transformers config.json dict (4.x or 5.x field names) into a ModelConfig."""
    mt = hf.get("model_type")
    if mt in ("llama", "mistral", "gemma2"):
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or h
        d_head = hf.get("head_dim") or d // h
        theta, frac, llama3 = _rope_params(hf)
        common = dict(
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["num_hidden_layers"],
            n_heads=h,
            n_kv_heads=kv,
            d_head=d_head,
            d_mlp=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rotary_fraction=frac,
            rope_llama3=llama3,
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            qkv_bias=bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)),
            name=name,
        )
        if mt == "gemma2":
            n = hf["num_hidden_layers"]
            types = hf.get("layer_types") or [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)
            ]
            return ModelConfig(
                family="gemma2",
                **common,
                norm="rms_offset",
                post_norms=True,
                act=_act(hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"),
                query_scale=float(hf.get("query_pre_attn_scalar", d_head)) ** -0.5,
                attn_softcap=hf.get("attn_logit_softcapping"),
                final_softcap=hf.get("final_logit_softcapping"),
                sliding_window=hf.get("sliding_window"),
                layer_windows=tuple(t == "sliding_attention" for t in types),
                embed_scale=math.sqrt(d),
                tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
            )
        window = hf.get("sliding_window") if mt == "mistral" else None
        return ModelConfig(
            family="llama",
            **common,
            act=_act(hf.get("hidden_act", "silu")),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=window,
            layer_windows=(True,) * hf["num_hidden_layers"] if window else (),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    if mt == "gpt_neox":
        d, h = hf["hidden_size"], hf["num_attention_heads"]
        theta, frac, llama3 = _rope_params(hf)
        return ModelConfig(
            family="gpt_neox",
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["num_hidden_layers"],
            n_heads=h,
            n_kv_heads=h,
            d_head=d // h,
            d_mlp=hf["intermediate_size"],
            norm="layer",
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            act=_act(hf.get("hidden_act", "gelu")),
            gated_mlp=False,
            mlp_bias=True,
            qkv_bias=bool(hf.get("attention_bias", True)),
            out_bias=bool(hf.get("attention_bias", True)),
            rope_theta=theta,
            rotary_fraction=frac,
            rope_llama3=llama3,
            max_positions=int(hf.get("max_position_embeddings", 2048)),
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            name=name,
        )
    if mt == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise SaeensError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported; use a standard GPT-2")
        d, h = hf["n_embd"], hf["n_head"]
        return ModelConfig(
            family="gpt2",
            vocab_size=hf["vocab_size"],
            d_model=d,
            n_layers=hf["n_layer"],
            n_heads=h,
            n_kv_heads=h,
            d_head=d // h,
            d_mlp=hf.get("n_inner") or 4 * d,
            norm="layer",
            norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            act=_act(hf.get("activation_function", "gelu_new")),
            gated_mlp=False,
            mlp_bias=True,
            qkv_bias=True,
            out_bias=True,
            query_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            positions="learned",
            max_positions=int(hf.get("n_positions", 1024)),
            tie_embeddings=True,
            name=name,
        )
    raise SaeensError(
        f"model_type {mt!r} is not supported; supported: llama, mistral, gemma2, gpt_neox, gpt2"
    )
