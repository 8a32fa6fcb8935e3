"""One SAE in the SAELens layout, out and in (the format every export directory is made of).

A directory that SAELens 6.x loads with ``sae_lens.SAE.load_from_disk(DIR)``:
  DIR/cfg.json                  SAELens 6 inference config (see `saelens_cfg`)
  DIR/sae_weights.safetensors   W_enc [d_in, m], b_enc [m], W_dec [m, d_in], b_dec [d_in]
                                (+ threshold [m] for JumpReLU), float32
  DIR/saeens_extra.safetensors  (JumpReLU only) the exact log_threshold, so our own reader
                                round-trips bit for bit; SAELens never reads it
Architectures (saeens arch -> SAELens ``architecture``):
  relu -> "standard";  topk -> "topk" (+ k, rescale_acts_by_decoder_norm=false);
  jumprelu -> "jumprelu" (threshold = exp(log_threshold));
  batchtopk -> "jumprelu", its inference form (per-latent threshold), as SAELens itself saves
  a BatchTopK SAE; metadata.training_architecture = "batchtopk" records where it came from.
Ensembles of such directories (and their manifest) are saeens/io/export.py's.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from saeens.config import ARCHS, SAEConfig
from saeens.errors import SaeensError
from saeens.io.files import read_json
from saeens.sae import Params

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
EXTRA_FILENAME = "saeens_extra.safetensors"
MANIFEST_FILENAME = "manifest.json"  # an ensemble export's (io/export.py): the reader points there
# The SAELens release this layout was verified against (tests load it with the real package).
# Written as metadata.sae_lens_version: SAELens treats configs without a version >= 6.0 as
# pre-6 configs and rewrites them, so the field must be present.
SAELENS_FORMAT_VERSION = "6.54.12"

TO_SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
TRAINING_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
_SAELENS_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")
_REEXPORT = "point at a directory written by `saeens export` or SAELens, or re-export it"


def saeens_version() -> str:
    import saeens

    return str(getattr(saeens, "__version__", "unknown"))


def _shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
    """Every SAELens tensor's shape for this SAE."""
    return {"W_enc": (cfg.d_in, cfg.width), "b_enc": (cfg.width,), "W_dec": (cfg.width, cfg.d_in),
            "b_dec": (cfg.d_in,), "threshold": (cfg.width,)}


def _np32(x: Any) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(jax.device_get(x), dtype=np.float32))


def saelens_tensors(cfg: SAEConfig, params: Params) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(the SAELens state dict, saeens-only extras) for one SAE, float32 numpy."""
    tensors = {k: _np32(params[k]) for k in _SAELENS_TENSORS}
    extra: dict[str, np.ndarray] = {}
    if cfg.arch == "jumprelu":
        log_threshold = _np32(params["log_threshold"])
        tensors["threshold"] = np.exp(log_threshold.astype(np.float64)).astype(np.float32)
        extra["log_threshold"] = log_threshold
    elif cfg.arch == "batchtopk":
        threshold = _np32(params["threshold"])
        if np.any(threshold < 0):
            raise SaeensError(
                "a BatchTopK threshold is negative, so the SAE has no JumpReLU form for SAELens: "
                "check the training run (the inference threshold should be >= 0)"
            )
        tensors["threshold"] = threshold
    shapes = _shapes(cfg)
    for k, v in tensors.items():
        if v.shape != shapes[k]:
            raise SaeensError(f"{k} has shape {v.shape}, expected {shapes[k]} for d_in={cfg.d_in}, width={cfg.width}")
        if not np.all(np.isfinite(v)):
            raise SaeensError(f"{k} holds NaN or Inf values: export a checkpoint from before training diverged")
    return tensors, extra


def saelens_cfg(cfg: SAEConfig, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The cfg.json of one SAE for SAELens 6.x (`SAEConfig.from_dict` of the architecture).

    Every architecture: architecture, d_in, d_sae, dtype="float32", device="cpu",
    apply_b_dec_to_input=true, normalize_activations="none", reshape_activations="none", metadata
    (sae_lens_version, model_name, hook_name, training_architecture(+_details), saeens_*).
    TopK adds k and rescale_acts_by_decoder_norm=false.
    """
    meta: dict[str, Any] = {
        "sae_lens_version": SAELENS_FORMAT_VERSION,
        "sae_lens_training_version": None,  # trained by saeens, not by SAELens
        "model_name": None,
        "hook_name": None,
        "training_architecture": TRAINING_ARCH[cfg.arch],
        "training_architecture_details": {"k": cfg.k} if cfg.arch in ("topk", "batchtopk") else {},
        "saeens_version": saeens_version(),
        "saeens_config": dataclasses.asdict(cfg),
    }
    meta.update(metadata or {})
    out: dict[str, Any] = {
        "architecture": TO_SAELENS_ARCH[cfg.arch],
        "d_in": cfg.d_in,
        "d_sae": cfg.width,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if cfg.arch == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    out["metadata"] = meta
    return out


def write_sae(path: Path, cfg_json: dict[str, Any], tensors: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> None:
    """One SAE's files into `path` (the caller makes the whole directory appear atomically)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILENAME), metadata={"format": "pt"})
    if extra:
        save_file(extra, str(path / EXTRA_FILENAME), metadata={"format": "np"})
    (path / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2) + "\n")


# ----------------------------------------------------------------------------- in


_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def _read_tensors_raw(path: Path) -> dict[str, np.ndarray]:
    """The safetensors layout by hand (8-byte header size, JSON header, data), for the dtypes
    safetensors.numpy cannot represent: SAELens also saves bfloat16 SAEs."""
    import ml_dtypes  # a jax dependency

    dtypes = {**_ST_DTYPES, "BF16": ml_dtypes.bfloat16}
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in dtypes:
            raise ValueError(f"tensor {name} has dtype {info['dtype']}, not a float type")
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]]).reshape(info["shape"])
        out[name] = arr.astype(np.float32)
    return out


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SaeensError(f"weights file {path} is missing: point at a directory written by `saeens export` or SAELens")
    try:
        try:
            return load_file(str(path))
        except TypeError:  # e.g. bfloat16, which numpy lacks
            return _read_tensors_raw(path)
    except (SafetensorError, OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise SaeensError(f"weights file {path} is unreadable ({first}): re-export it") from None


def _sae_config_from(cfg_json: dict[str, Any], path: Path) -> SAEConfig:
    """Our SAEConfig: the SAELens fields decide shape and activation; saeens_config the rest."""
    arch_sl = cfg_json.get("architecture")
    meta = cfg_json.get("metadata") or {}
    if not isinstance(meta, dict):
        meta = {}
    if arch_sl == "standard":
        arch = "relu"
    elif arch_sl == "topk":
        arch = "topk"
    elif arch_sl == "jumprelu":
        arch = "batchtopk" if meta.get("training_architecture") == "batchtopk" else "jumprelu"
    else:
        raise SaeensError(
            f"{path / CFG_FILENAME}: SAELens architecture {arch_sl!r} is not supported: "
            "saeens reads 'standard', 'topk' and 'jumprelu' SAEs"
        )
    try:
        d_in, width = int(cfg_json["d_in"]), int(cfg_json["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise SaeensError(f"{path / CFG_FILENAME} lacks integer d_in/d_sae: re-export the directory") from None
    if cfg_json.get("normalize_activations", "none") != "none":
        raise SaeensError(
            f"{path / CFG_FILENAME}: normalize_activations={cfg_json['normalize_activations']!r} is not supported: "
            "fold the normalisation into the weights in SAELens first (normalize_activations='none')"
        )
    if arch_sl == "topk" and cfg_json.get("rescale_acts_by_decoder_norm", False):
        raise SaeensError(
            f"{path / CFG_FILENAME}: rescale_acts_by_decoder_norm=true is not supported: "
            "normalise the decoder rows in SAELens first"
        )
    own = meta.get("saeens_config")
    fields = {f.name for f in dataclasses.fields(SAEConfig)}
    kw = {k: v for k, v in own.items() if k in fields} if isinstance(own, dict) else {}
    if kw.get("arch") not in ARCHS or TO_SAELENS_ARCH[kw["arch"]] != arch_sl:
        kw["arch"] = arch
    kw.update(d_in=d_in, width=width)
    if arch_sl == "topk":
        kw["k"] = int(cfg_json.get("k", kw.get("k", 0)))
    if kw["arch"] == "batchtopk":
        details = meta.get("training_architecture_details") or {}
        k = kw.get("k", details.get("k") if isinstance(details, dict) else None)
        kw["k"] = int(k) if k is not None else min(width, SAEConfig.k)
    try:
        return SAEConfig(**kw)
    except (TypeError, ValueError) as e:
        raise SaeensError(f"{path / CFG_FILENAME} describes no valid SAE ({e}): re-export the directory") from None


def load_saelens(path: Path | str) -> tuple[SAEConfig, Params]:
    """Read ONE SAE in the SAELens layout (ours or SAELens' own) -> (SAEConfig, params).

    The inverse of one SAE of `export_saelens`, bit for bit; no sae_lens import. A SAELens
    "jumprelu" dir whose metadata says training_architecture="batchtopk" comes back as batchtopk.
    apply_b_dec_to_input=false is folded into b_enc (b_enc + b_dec @ W_enc).
    """
    path = Path(path)
    if not path.is_dir():
        raise SaeensError(f"SAE directory {path} does not exist: check the path")
    if not (path / CFG_FILENAME).exists() and (path / MANIFEST_FILENAME).exists():
        raise SaeensError(f"{path} is an ensemble export with no single SAE (see its manifest.json): use saeens.io.export.load_export({str(path)!r})")
    cfg_json = read_json(path / CFG_FILENAME, "SAELens config", _REEXPORT)
    cfg = _sae_config_from(cfg_json, path)
    tensors = _read_tensors(path / WEIGHTS_FILENAME)
    want = set(_SAELENS_TENSORS) | ({"threshold"} if cfg.arch in ("jumprelu", "batchtopk") else set())
    missing, unknown = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unknown:
        raise SaeensError(
            f"{path / WEIGHTS_FILENAME} has tensors {sorted(tensors)}: missing {missing}, unexpected {unknown} "
            f"for a {cfg_json['architecture']!r} SAE; re-export the directory"
        )
    shapes = _shapes(cfg)
    arrs = {}
    for k, v in tensors.items():
        if tuple(v.shape) != shapes[k]:
            raise SaeensError(f"{path / WEIGHTS_FILENAME}: {k} has shape {tuple(v.shape)}, cfg.json implies {shapes[k]}: re-export it")
        arrs[k] = np.asarray(v, np.float32)
    if not cfg_json.get("apply_b_dec_to_input", True):
        arrs["b_enc"] = (arrs["b_enc"].astype(np.float64) + arrs["b_dec"].astype(np.float64) @ arrs["W_enc"]).astype(np.float32)
    if cfg.arch == "jumprelu":
        threshold = arrs.pop("threshold")
        log_threshold = None
        if (path / EXTRA_FILENAME).is_file():
            extra = _read_tensors(path / EXTRA_FILENAME)
            lt = extra.get("log_threshold")
            # Use the exact value only while it still matches the SAELens threshold (not edited since).
            if lt is not None and lt.shape == threshold.shape and np.allclose(np.exp(lt.astype(np.float64)), threshold, rtol=1e-6, atol=0):
                log_threshold = np.asarray(lt, np.float32)
        if log_threshold is None:
            with np.errstate(divide="ignore"):
                log_threshold = np.log(np.maximum(threshold.astype(np.float64), 0.0)).astype(np.float32)
        arrs["log_threshold"] = log_threshold
    return cfg, {k: jax.device_put(v) for k, v in arrs.items()}  # device_put: no per-shape compile
