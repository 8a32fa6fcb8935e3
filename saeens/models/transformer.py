"""Flax NNX decoder transformer: one block for Llama, Gemma 2, GPT-NeoX and GPT-2.

Per-family differences are fields of ModelConfig read at trace time (norm kind, gated mlp, parallel
residual, partial rotary, softcaps, sliding windows, learned positions, tied embeddings). The NNX
classes only hold weights; the maths is in small pure functions below so it can be read and reused.

Shape suffixes: B batch, T query positions, S key positions, D d_model, H query heads, G kv heads,
R query heads per kv head (H = G*R), K d_head, F d_mlp, V vocab, P positions.
Padding: attention is causal, so right-padded batches give the same values at the real tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saeens.errors import SaeensError
from saeens.models.config import ModelConfig
from saeens.models.hooks import hook_name

Array = jax.Array
# hook_fn(hook_name, acts) -> acts: called at every named site; return the acts to continue with.
HookFn = Callable[[str, Array], Array]
_NEG_INF = -1e30  # finite, so fully-masked rows cannot produce NaN


# ----------------------------------------------------------------------------- pure functions
def norm(x_BTD: Array, scale_D: Array, bias_D: Array | None, kind: str, eps: float) -> Array:
    """RMSNorm (Llama), (1+w) RMSNorm (Gemma) or LayerNorm (GPT-2/NeoX), statistics in float32."""
    x = x_BTD.astype(jnp.float32)
    if kind == "layer":
        x = x - x.mean(-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    w = scale_D.astype(jnp.float32)
    y = y * (1.0 + w if kind == "rms_offset" else w)
    if bias_D is not None:
        y = y + bias_D.astype(jnp.float32)
    return y.astype(x_BTD.dtype)


def activation(x: Array, kind: str) -> Array:
    if kind == "silu":
        return jax.nn.silu(x)
    if kind == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if kind == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.relu(x)


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies of the rotated channel pairs, with Llama 3.1 frequency scaling if set."""
    rot = cfg.rotary_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, rot, 2, dtype=np.float64) / rot))
    if cfg.rope_llama3 is not None:
        factor, low, high, old_len = cfg.rope_llama3
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(cfg: ModelConfig, n_pos: int) -> tuple[Array, Array]:
    """cos/sin of shape [T, rotary_dim] in the HF "rotate_half" layout (two halves, not interleaved)."""
    inv_R2 = jnp.asarray(rope_inv_freq(cfg))
    ang_TR2 = jnp.arange(n_pos, dtype=jnp.float32)[:, None] * inv_R2[None, :]
    ang_TR = jnp.concatenate([ang_TR2, ang_TR2], axis=-1)
    return jnp.cos(ang_TR), jnp.sin(ang_TR)


def apply_rope(x_BTHK: Array, cos_TR: Array, sin_TR: Array) -> Array:
    """Rotate the first R channels of each head; the rest pass through (GPT-NeoX partial rotary)."""
    rot = cos_TR.shape[-1]
    x_rot, x_pass = x_BTHK[..., :rot].astype(jnp.float32), x_BTHK[..., rot:]
    x1, x2 = jnp.split(x_rot, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos_TR[None, :, None, :], sin_TR[None, :, None, :]
    out = (x_rot * cos + rotated * sin).astype(x_BTHK.dtype)
    return jnp.concatenate([out, x_pass], axis=-1) if x_pass.shape[-1] else out


def attention_mask(n_q: int, n_k: int, window: int | None) -> Array:
    """Causal [T, S] mask; with a window, a query sees only the last `window` keys (itself included)."""
    q_T1 = jnp.arange(n_q)[:, None]
    k_1S = jnp.arange(n_k)[None, :]
    mask_TS = k_1S <= q_T1
    if window is not None:
        mask_TS = mask_TS & (q_T1 - k_1S < window)
    return mask_TS


def softcap(x: Array, cap: float | None) -> Array:
    return x if cap is None else cap * jnp.tanh(x / cap)


def _init(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, std: float = 0.02) -> nnx.Param:
    """N(0, std) weights; with rngs=None only the shape (loaders fill it: no allocation, no tracing)."""
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    # numpy draws seeded by the nnx key: jax.random.normal would compile threefry once per shape
    # (seconds each on a small CPU); these are only starting points, the loaders overwrite them.
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):  # under nnx.eval_shape / nnx.jit: stay in jax
        return nnx.Param((std * jax.random.normal(key, shape, jnp.float32)).astype(dtype))
    seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
    w = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * std
    return nnx.Param(jnp.asarray(w, dtype=dtype))


def _const(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, value: float = 0.0) -> nnx.Param:
    if rngs is None:
        return nnx.Param(jax.ShapeDtypeStruct(shape, jnp.dtype(dtype)))
    return nnx.Param(jnp.full(shape, value, dtype))


# ----------------------------------------------------------------------------- NNX modules
class Norm(nnx.Module):
    """Holds scale (and LayerNorm bias); Gemma's (1+w) form stores w, so zeros is the identity."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        one = 0.0 if cfg.norm == "rms_offset" else 1.0
        self.scale_D = _const(rngs, (cfg.d_model,), dtype, one)
        self.bias_D = _const(rngs, (cfg.d_model,), dtype) if cfg.norm == "layer" else None

    def __call__(self, x_BTD: Array) -> Array:
        bias = self.bias_D[...] if self.bias_D is not None else None
        return norm(x_BTD, self.scale_D[...], bias, self.kind, self.eps)


class Attention(nnx.Module):
    """Multi-head / grouped-query attention with rope, optional softcap and sliding window."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.W_q_DHK = _init(rngs, (D, H, K), dtype)
        self.W_k_DGK = _init(rngs, (D, G, K), dtype)
        self.W_v_DGK = _init(rngs, (D, G, K), dtype)
        self.W_o_HKD = _init(rngs, (H, K, D), dtype)
        self.b_q_HK = _const(rngs, (H, K), dtype) if cfg.qkv_bias else None
        self.b_k_GK = _const(rngs, (G, K), dtype) if cfg.qkv_bias else None
        self.b_v_GK = _const(rngs, (G, K), dtype) if cfg.qkv_bias else None
        self.b_o_D = _const(rngs, (D,), dtype) if cfg.out_bias else None

    def __call__(self, cfg: ModelConfig, x_BTD: Array, rope: tuple[Array, Array] | None, local: bool) -> Array:
        q_BTHK = jnp.einsum("btd,dhk->bthk", x_BTD, self.W_q_DHK[...])
        k_BSGK = jnp.einsum("bsd,dgk->bsgk", x_BTD, self.W_k_DGK[...])
        v_BSGK = jnp.einsum("bsd,dgk->bsgk", x_BTD, self.W_v_DGK[...])
        if self.b_q_HK is not None:
            q_BTHK = q_BTHK + self.b_q_HK[...]
            k_BSGK = k_BSGK + self.b_k_GK[...]
            v_BSGK = v_BSGK + self.b_v_GK[...]
        if rope is not None and cfg.rotary_dim:
            q_BTHK = apply_rope(q_BTHK, *rope)
            k_BSGK = apply_rope(k_BSGK, *rope)
        B, T, H, K = q_BTHK.shape
        G = k_BSGK.shape[2]
        q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
        scale = cfg.query_scale if cfg.query_scale is not None else K**-0.5
        logits_BGRTS = jnp.einsum(
            "btgrk,bsgk->bgrts", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32
        ) * scale
        logits_BGRTS = softcap(logits_BGRTS, cfg.attn_softcap)
        mask_TS = attention_mask(T, T, cfg.sliding_window if local else None)
        logits_BGRTS = jnp.where(mask_TS, logits_BGRTS, _NEG_INF)
        probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v_BSGK.dtype)
        z_BTGRK = jnp.einsum("bgrts,bsgk->btgrk", probs_BGRTS, v_BSGK)
        out_BTD = jnp.einsum("bthk,hkd->btd", z_BTGRK.reshape(B, T, H, K), self.W_o_HKD[...])
        return out_BTD + self.b_o_D[...] if self.b_o_D is not None else out_BTD


class MLP(nnx.Module):
    """Gated (SwiGLU / GeGLU: act(x W_gate) * x W_in) or plain (act(x W_in)) feed-forward."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        D, F = cfg.d_model, cfg.d_mlp
        self.W_in_DF = _init(rngs, (D, F), dtype)
        self.W_gate_DF = _init(rngs, (D, F), dtype) if cfg.gated_mlp else None
        self.W_out_FD = _init(rngs, (F, D), dtype)
        self.b_in_F = _const(rngs, (F,), dtype) if cfg.mlp_bias else None
        self.b_gate_F = _const(rngs, (F,), dtype) if cfg.mlp_bias and cfg.gated_mlp else None
        self.b_out_D = _const(rngs, (D,), dtype) if cfg.mlp_bias else None

    def __call__(self, cfg: ModelConfig, x_BTD: Array) -> Array:
        h_BTF = jnp.einsum("btd,df->btf", x_BTD, self.W_in_DF[...])
        if self.b_in_F is not None:
            h_BTF = h_BTF + self.b_in_F[...]
        if self.W_gate_DF is not None:
            g_BTF = jnp.einsum("btd,df->btf", x_BTD, self.W_gate_DF[...])
            if self.b_gate_F is not None:
                g_BTF = g_BTF + self.b_gate_F[...]
            h_BTF = activation(g_BTF, cfg.act) * h_BTF
        else:
            h_BTF = activation(h_BTF, cfg.act)
        out_BTD = jnp.einsum("btf,fd->btd", h_BTF, self.W_out_FD[...])
        return out_BTD + self.b_out_D[...] if self.b_out_D is not None else out_BTD


class Block(nnx.Module):
    """One layer. Sequential: x += attn(ln x); x += mlp(ln x). Parallel (NeoX): x += attn(ln1 x) + mlp(ln2 x)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.ln_attn = Norm(cfg, rngs=rngs, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs, dtype=dtype)
        self.ln_attn_post = Norm(cfg, rngs=rngs, dtype=dtype) if cfg.post_norms else None
        self.ln_mlp = Norm(cfg, rngs=rngs, dtype=dtype)
        self.mlp = MLP(cfg, rngs=rngs, dtype=dtype)
        self.ln_mlp_post = Norm(cfg, rngs=rngs, dtype=dtype) if cfg.post_norms else None

    def __call__(
        self, cfg: ModelConfig, x_BTD: Array, rope: tuple[Array, Array] | None, local: bool, hook: Callable
    ) -> Array:
        x_BTD = hook("resid_pre", x_BTD)
        attn_BTD = self.attn(cfg, self.ln_attn(x_BTD), rope, local)
        if self.ln_attn_post is not None:
            attn_BTD = self.ln_attn_post(attn_BTD)
        attn_BTD = hook("attn_out", attn_BTD)
        if cfg.parallel_residual:
            mlp_BTD = hook("mlp_out", self._mlp(cfg, x_BTD))
            x_BTD = x_BTD + attn_BTD + mlp_BTD
        else:
            x_BTD = hook("resid_mid", x_BTD + attn_BTD)
            x_BTD = x_BTD + hook("mlp_out", self._mlp(cfg, x_BTD))
        return hook("resid_post", x_BTD)

    def _mlp(self, cfg: ModelConfig, x_BTD: Array) -> Array:
        out_BTD = self.mlp(cfg, self.ln_mlp(x_BTD))
        return self.ln_mlp_post(out_BTD) if self.ln_mlp_post is not None else out_BTD


class Transformer(nnx.Module):
    """Decoder-only LM. `model(tokens_BT) -> logits_BTV`; `model.forward` adds hooks and early stopping.

    Random weights: `Transformer(cfg, rngs=nnx.Rngs(0))`; real ones: `load_model`. rngs=None builds
    shapes only (jax.ShapeDtypeStruct leaves), which `build_model` fills with loaded arrays.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None, dtype=jnp.float32):
        self.cfg = cfg
        self.W_E_VD = _init(rngs, (cfg.vocab_size, cfg.d_model), dtype)
        self.W_pos_PD = _init(rngs, (cfg.max_positions, cfg.d_model), dtype) if cfg.positions == "learned" else None
        self.blocks = nnx.List([Block(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.n_layers)])
        self.ln_final = Norm(cfg, rngs=rngs, dtype=dtype)
        self.W_U_DV = None if cfg.tie_embeddings else _init(rngs, (cfg.d_model, cfg.vocab_size), dtype)

    def __call__(self, tokens_BT: Array) -> Array:
        return self.forward(tokens_BT)

    def embed(self, tokens_BT: Array) -> Array:
        W_E_VD = self.W_E_VD[...]
        x_BTD = jnp.take(W_E_VD, tokens_BT, axis=0)
        if self.cfg.embed_scale != 1.0:
            x_BTD = x_BTD * jnp.asarray(self.cfg.embed_scale, x_BTD.dtype)
        if self.W_pos_PD is not None:
            x_BTD = x_BTD + self.W_pos_PD[...][: tokens_BT.shape[1]][None]
        return x_BTD

    def unembed(self, x_BTD: Array) -> Array:
        """Final norm, unembedding (tied or not) and Gemma's final logit softcap; logits in float32."""
        x_BTD = self.ln_final(x_BTD)
        if self.W_U_DV is None:
            logits_BTV = jnp.einsum("btd,vd->btv", x_BTD, self.W_E_VD[...], preferred_element_type=jnp.float32)
        else:
            logits_BTV = jnp.einsum("btd,dv->btv", x_BTD, self.W_U_DV[...], preferred_element_type=jnp.float32)
        return softcap(logits_BTV, self.cfg.final_softcap)

    def forward(self, tokens_BT: Array, hook_fn: HookFn | None = None, stop_layer: int | None = None) -> Array:
        """Logits, or the residual stream after block `stop_layer` (later blocks, final norm and unembed
        are never traced). `hook_fn(name, acts) -> acts` sees every site, in order, and may replace it."""
        cfg = self.cfg
        T = tokens_BT.shape[1]
        if cfg.positions == "learned" and T > cfg.max_positions:
            raise SaeensError(f"sequence length {T} exceeds the model's {cfg.max_positions} positions; use shorter contexts")
        rope = rope_tables(cfg, T) if cfg.positions == "rope" else None
        x_BTD = self.embed(tokens_BT)
        last = cfg.n_layers - 1 if stop_layer is None else stop_layer
        for i in range(last + 1):
            if hook_fn is None:
                hook = _identity_hook
            else:
                hook = lambda site, x, i=i: hook_fn(hook_name(i, site), x)  # noqa: E731
            x_BTD = self.blocks[i](cfg, x_BTD, rope, cfg.is_local(i), hook)
        return x_BTD if stop_layer is not None else self.unembed(x_BTD)


def _identity_hook(site: str, x: Array) -> Array:
    return x
