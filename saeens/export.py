"""SAELens-format files in and out (DESIGN.md, "Export (SAELens layout)").

One SAE is a directory that SAELens 6.x loads with ``sae_lens.SAE.load_from_disk(DIR)``:
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
An ensemble is a directory of SAEs plus DIR/manifest.json:
  single / expanded   the one SAE at DIR (no manifest)
  bagging             DIR/member_<j>/ for every member; relu/jumprelu/batchtopk members are
                      exactly one SAE (Proposition 1, `ensemble.to_single`), also written at DIR;
                      TopK members are not one global-TopK SAE: nothing at DIR, and the manifest
                      says why ("single_equivalent": null)
  boosting            DIR/stage_<j>/, applied in manifest "order" on residuals
Writes go to a sibling DIR.tmp-xxx that is renamed into place at the end, so a failed export
leaves nothing half-written, and a non-empty DIR is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from saeens import ensemble as ens_lib
from saeens import sae as sae_lib
from saeens.config import ARCHS, METHODS, SAEConfig
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.sae import Params

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
EXTRA_FILENAME = "saeens_extra.safetensors"
MANIFEST_FILENAME = "manifest.json"
MANIFEST_FORMAT = "saeens-saelens-export"
# The SAELens release this layout was verified against (tests load it with the real package).
# Written as metadata.sae_lens_version: SAELens treats configs without a version >= 6.0 as
# pre-6 configs and rewrites them, so the field must be present.
SAELENS_FORMAT_VERSION = "6.54.12"

_TO_SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_TRAINING_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "batchtopk"}
_SAELENS_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _saeens_version() -> str:
    import saeens

    return str(getattr(saeens, "__version__", "unknown"))


# ----------------------------------------------------------------------------- one SAE, out


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
    shapes = {"W_enc": (cfg.d_in, cfg.width), "b_enc": (cfg.width,), "W_dec": (cfg.width, cfg.d_in),
              "b_dec": (cfg.d_in,), "threshold": (cfg.width,)}
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
        "training_architecture": _TRAINING_ARCH[cfg.arch],
        "training_architecture_details": {"k": cfg.k} if cfg.arch in ("topk", "batchtopk") else {},
        "saeens_version": _saeens_version(),
        "saeens_config": dataclasses.asdict(cfg),
    }
    meta.update(metadata or {})
    out: dict[str, Any] = {
        "architecture": _TO_SAELENS_ARCH[cfg.arch],
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


def _write_sae(path: Path, cfg_json: dict[str, Any], tensors: dict[str, np.ndarray], extra: dict[str, np.ndarray]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / WEIGHTS_FILENAME), metadata={"format": "pt"})
    if extra:
        save_file(extra, str(path / EXTRA_FILENAME), metadata={"format": "np"})
    (path / CFG_FILENAME).write_text(json.dumps(cfg_json, indent=2) + "\n")


# ----------------------------------------------------------------------------- ensembles, out


def _check_target(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SaeensError(f"export target {out} is a file: pass a new or empty directory to --out")
    if out.is_dir() and any(out.iterdir()):
        raise SaeensError(f"export directory {out} is not empty: pass a new or empty directory to --out (nothing was written)")


def _check_method(ens: Ensemble, method: str) -> None:
    if method not in METHODS:
        raise SaeensError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    J = ens.n_members
    if method in ("single", "expanded") and J != 1:
        raise SaeensError(f"method {method!r} exports one SAE but the ensemble has {J} members: pass method='bagging' or 'boosting'")
    if method == "boosting" and not ens.sequential:
        raise SaeensError("method 'boosting' needs a sequential ensemble (ensemble.boosting): pass method='bagging'")
    if method == "bagging" and ens.sequential:
        raise SaeensError(f"this ensemble encodes sequentially (boosting) but method is {method!r}: pass method='boosting'")
    w = np.asarray(jax.device_get(ens.weights), np.float64)
    if w.shape != (J,) or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise SaeensError("ensemble weights must be J finite values >= 0: rebuild the ensemble with ensemble.bagging/boosting")


def export_saelens(
    ens: Ensemble,
    method: str,
    out: Path | str,
    *,
    hook_name: str | None = None,
    model_name: str | None = None,
    d_in: int | None = None,
    scale: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `ens` in the SAELens layout at `out` (see the module docstring); returns `out`.

    hook_name, model_name and `metadata` (e.g. context_size, prepend_bos, dataset_path,
    hook_head_index) go into every cfg.json's metadata. d_in, when given, must match the SAEs.
    scale: the activation scale the ensemble was trained at (TrainConfig.normalize_activations),
    folded into the weights (sae.fold_scale) so SAELens sees raw activations.
    """
    out = Path(out)
    _check_target(out)
    _check_method(ens, method)
    cfg = ens.cfg
    if d_in is not None and d_in != cfg.d_in:
        raise SaeensError(f"d_in={d_in} does not match the SAEs' d_in={cfg.d_in}: export the run trained on these activations")
    if scale is not None:
        scale = float(scale)
        if not (math.isfinite(scale) and scale > 0):
            raise SaeensError(f"activation scale must be a finite number > 0, got {scale}: check the run's config")
        ens = dataclasses.replace(ens, params=jax.jit(sae_lib.fold_scale, static_argnums=1)(ens.params, cfg, scale))

    J = ens.n_members
    host = {k: np.asarray(jax.device_get(v)) for k, v in ens.params.items()}  # index members on the host
    common = {"model_name": model_name, "hook_name": hook_name, **(metadata or {}), "saeens_method": method}
    weights = [float(w) for w in np.asarray(jax.device_get(ens.weights), np.float32)]

    # Build every file's content before touching the disk: a refusal writes nothing.
    saes: dict[str, tuple[dict[str, Any], dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    manifest: dict[str, Any] | None = None
    if method in ("single", "expanded"):
        tensors, extra = saelens_tensors(cfg, {k: v[0] for k, v in host.items()})
        saes["."] = (saelens_cfg(cfg, {**common, "saeens_role": method}), tensors, extra)
    else:
        prefix = "stage" if method == "boosting" else "member"
        names = [f"{prefix}_{j}" for j in range(J)]
        for j, name in enumerate(names):
            tensors, extra = saelens_tensors(cfg, {k: v[j] for k, v in host.items()})
            role = {"saeens_role": prefix, "saeens_index": j, "saeens_weight": weights[j], "saeens_members": J}
            saes[name] = (saelens_cfg(cfg, {**common, **role}), tensors, extra)
        single_equivalent: str | None = None
        reason: str | None = None
        if method == "boosting":
            reason = "boosting encodes stage by stage on residuals, which no single SAE does: apply the stages in order"
        elif cfg.arch == "topk":
            reason = ("TopK members are not one global-TopK SAE (each member keeps its own k latents): "
                      "combine the members' reconstructions as the manifest says")
        else:
            single_cfg, single_params = ens_lib.to_single(ens)
            tensors, extra = saelens_tensors(single_cfg, single_params)
            role = {"saeens_role": "single_equivalent", "saeens_members": J,
                    "training_architecture": _TRAINING_ARCH[cfg.arch],
                    "training_architecture_details": {"k": cfg.k} if cfg.arch == "batchtopk" else {}}
            saes["."] = (saelens_cfg(single_cfg, {**common, **role}), tensors, extra)
            single_equivalent = "."
        if method == "boosting":
            combine = "sum of stage reconstructions on residuals"
        elif all(w == weights[0] for w in weights) and np.isclose(weights[0] * J, 1.0):
            combine = "mean of member reconstructions"
        else:
            combine = "weighted sum of member reconstructions (weights)"
        manifest = {
            "format": MANIFEST_FORMAT,
            "method": method,
            "members": J,
            "member_dirs": names,
            "weights": weights,
            "order": names,
            "sequential": method == "boosting",
            "combine": combine,
            "architecture": cfg.arch,
            "saelens_architecture": _TO_SAELENS_ARCH[cfg.arch],
            "d_in": cfg.d_in,
            "width": cfg.width,
            "single_equivalent": single_equivalent,
            "single_equivalent_reason": reason,
            "single_equivalent_architecture": (
                None if single_equivalent is None else _TO_SAELENS_ARCH["jumprelu" if cfg.arch == "batchtopk" else cfg.arch]
            ),
            "hook_name": hook_name,
            "model_name": model_name,
            "saeens_config": dataclasses.asdict(cfg),
            "saeens_version": _saeens_version(),
        }

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    except OSError as e:
        raise SaeensError(f"cannot write next to {out} ({e.strerror}): pass an --out directory you can write to") from None
    try:
        for rel, (cfg_json, tensors, extra) in saes.items():
            _write_sae(tmp / rel, cfg_json, tensors, extra)
        if manifest is not None:
            (tmp / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _check_target(out)  # again: something may have appeared meanwhile
        os.chmod(tmp, 0o777 & ~_umask())
        os.replace(tmp, out)  # atomic; replaces an empty directory, refuses a non-empty one
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SaeensError(
            f"writing the export to {out} failed ({e.strerror or e}): free disk space or pass a new, empty --out directory (nothing was written)"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- in


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise SaeensError(f"{what} {path} is missing: point at a directory written by `saeens export` or SAELens")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaeensError(f"{what} {path} is not valid JSON ({e}): re-export the directory") from None
    if not isinstance(d, dict):
        raise SaeensError(f"{what} {path} must hold a JSON object: re-export the directory")
    return d


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
    if kw.get("arch") not in ARCHS or _TO_SAELENS_ARCH[kw["arch"]] != arch_sl:
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
        raise SaeensError(f"{path} is an ensemble export with no single SAE (see its manifest.json): use load_export({str(path)!r})")
    cfg_json = _read_json(path / CFG_FILENAME, "SAELens config")
    cfg = _sae_config_from(cfg_json, path)
    tensors = _read_tensors(path / WEIGHTS_FILENAME)
    want = set(_SAELENS_TENSORS) | ({"threshold"} if cfg.arch in ("jumprelu", "batchtopk") else set())
    missing, unknown = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unknown:
        raise SaeensError(
            f"{path / WEIGHTS_FILENAME} has tensors {sorted(tensors)}: missing {missing}, unexpected {unknown} "
            f"for a {cfg_json['architecture']!r} SAE; re-export the directory"
        )
    shapes = {"W_enc": (cfg.d_in, cfg.width), "b_enc": (cfg.width,), "W_dec": (cfg.width, cfg.d_in),
              "b_dec": (cfg.d_in,), "threshold": (cfg.width,)}
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


def load_export(path: Path | str) -> Ensemble:
    """Read an export back: the ensemble of manifest.json when present, else one SAE (J=1)."""
    path = Path(path)
    if not path.is_dir():
        raise SaeensError(f"export directory {path} does not exist: check the path")
    if not (path / MANIFEST_FILENAME).exists():
        cfg, params = load_saelens(path)  # == ensemble.single(cfg, params), without device ops
        stacked = {k: jax.device_put(np.asarray(v)[None]) for k, v in params.items()}
        return Ensemble(stacked, jax.device_put(np.ones((1,), np.float32)), cfg)
    man = _read_json(path / MANIFEST_FILENAME, "manifest")
    method = man.get("method")
    if method not in ("bagging", "boosting"):
        raise SaeensError(f"{path / MANIFEST_FILENAME}: method {method!r} is not 'bagging' or 'boosting': re-export the run")
    names, weights = man.get("member_dirs") or man.get("order"), man.get("weights")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SaeensError(f"{path / MANIFEST_FILENAME} lists no member directories: re-export the run")
    bad = [n for n in names if n != Path(n).name or n.startswith(".")]
    if bad:
        raise SaeensError(f"{path / MANIFEST_FILENAME}: member directories {bad} are not plain names inside the export: re-export the run")
    if not isinstance(weights, list) or len(weights) != len(names):
        raise SaeensError(f"{path / MANIFEST_FILENAME}: {len(names)} members but weights {weights!r}: re-export the run")
    if isinstance(man.get("members"), int) and man["members"] != len(names):
        raise SaeensError(f"{path / MANIFEST_FILENAME}: members={man['members']} but {len(names)} directories: re-export the run")
    order = man.get("order") or names
    if method == "boosting":  # stages in the order they are applied; weights follow their member
        if sorted(order) != sorted(names):
            raise SaeensError(f"{path / MANIFEST_FILENAME}: order {order} is not a permutation of {names}: re-export the run")
        weights = [weights[names.index(n)] for n in order]
        names = list(order)
    loaded = [load_saelens(path / n) for n in names]
    cfg0 = loaded[0][0]
    for n, (c, _) in zip(names, loaded):
        if c != cfg0:
            raise SaeensError(f"member {n} has config {c}, unlike {names[0]} ({cfg0}): members must share one architecture")
    params = {k: jax.device_put(np.stack([np.asarray(p[k]) for _, p in loaded])) for k in loaded[0][1]}
    try:
        w = jax.device_put(np.asarray(weights, np.float32))
    except (TypeError, ValueError):
        raise SaeensError(f"{path / MANIFEST_FILENAME}: weights {weights!r} are not numbers: re-export the run") from None
    return Ensemble(params, w, cfg0, sequential=method == "boosting")
