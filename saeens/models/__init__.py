"""Flax NNX decoder transformers (Llama, Gemma 2, GPT-NeoX, GPT-2) with TransformerLens-style hook
sites, and offline weight loading (HF safetensors directories, GGUF).

    model, tok = load_model("smollm2-135m")
    acts_BTD = run_to_hook(model, tokens_BT, "blocks.12.hook_resid_post")
    logits_BTV = run_with_splice(model, tokens_BT, "blocks.12.hook_resid_post", sae_fn)
"""

from saeens.models.config import ModelConfig, from_hf_config
from saeens.models.hooks import SITES, hook_name, parse_hook
from saeens.models.gguf import load_gguf
from saeens.models.loading import build_model, load_hf_dir
from saeens.models.registry import MODELS, known_models, load_model, package_file, resolve
from saeens.models.run import logits, run_to_hook, run_with_cache, run_with_splice, token_nll
from saeens.models.transformer import Transformer

__all__ = [
    "MODELS",
    "SITES",
    "ModelConfig",
    "Transformer",
    "build_model",
    "from_hf_config",
    "hook_name",
    "known_models",
    "load_gguf",
    "load_hf_dir",
    "load_model",
    "logits",
    "package_file",
    "parse_hook",
    "resolve",
    "run_to_hook",
    "run_with_cache",
    "run_with_splice",
    "token_nll",
]
