"""Ensembles as directories of SAELens-layout SAEs (saeens/io/saelens.py) plus a manifest.

  single / expanded   the one SAE at DIR (no manifest)
  bagging             DIR/member_<j>/ for every member; relu/jumprelu/batchtopk members are
                      exactly one SAE (`ensemble.to_single`: the members' decoders concatenated,
                      encoders scaled by 1/J), also written at DIR; TopK members are not one
                      global-TopK SAE: nothing at DIR, and the manifest says why
                      ("single_equivalent": null)
  boosting            DIR/stage_<j>/, applied in manifest "order" on residuals
  sweep               DIR/member_<j>/, each a separate SAE (the members differ in settings)
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

from saeens import ensemble as ens_lib
from saeens import sae as sae_lib
from saeens.config import METHODS
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.io.files import read_json
from saeens.io.saelens import (
    MANIFEST_FILENAME,
    TO_SAELENS_ARCH,
    TRAINING_ARCH,
    load_saelens,
    saeens_version,
    saelens_cfg,
    saelens_tensors,
    write_sae,
)

MANIFEST_FORMAT = "saeens-saelens-export"


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
        elif method == "sweep":
            reason = "a sweep's members are separate SAEs trained with different settings: use each member_<j> on its own"
        elif cfg.arch == "topk":
            reason = ("TopK members are not one global-TopK SAE (each member keeps its own k latents): "
                      "combine the members' reconstructions as the manifest says")
        else:
            single_cfg, single_params = ens_lib.to_single(ens)
            tensors, extra = saelens_tensors(single_cfg, single_params)
            role = {"saeens_role": "single_equivalent", "saeens_members": J,
                    "training_architecture": TRAINING_ARCH[cfg.arch],
                    "training_architecture_details": {"k": cfg.k} if cfg.arch == "batchtopk" else {}}
            saes["."] = (saelens_cfg(single_cfg, {**common, **role}), tensors, extra)
            single_equivalent = "."
        if method == "boosting":
            combine = "sum of stage reconstructions on residuals"
        elif method == "sweep":
            combine = "none: each member is a separate SAE"
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
            "saelens_architecture": TO_SAELENS_ARCH[cfg.arch],
            "d_in": cfg.d_in,
            "width": cfg.width,
            "single_equivalent": single_equivalent,
            "single_equivalent_reason": reason,
            "single_equivalent_architecture": (
                None if single_equivalent is None else TO_SAELENS_ARCH["jumprelu" if cfg.arch == "batchtopk" else cfg.arch]
            ),
            "hook_name": hook_name,
            "model_name": model_name,
            "saeens_config": dataclasses.asdict(cfg),
            "saeens_version": saeens_version(),
        }

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    except OSError as e:
        raise SaeensError(f"cannot write next to {out} ({e.strerror}): pass an --out directory you can write to") from None
    try:
        for rel, (cfg_json, tensors, extra) in saes.items():
            write_sae(tmp / rel, cfg_json, tensors, extra)
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


def load_export(path: Path | str) -> Ensemble:
    """Read an export back: the ensemble of manifest.json when present, else one SAE (J=1)."""
    path = Path(path)
    if not path.is_dir():
        raise SaeensError(f"export directory {path} does not exist: check the path")
    if not (path / MANIFEST_FILENAME).exists():
        cfg, params = load_saelens(path)  # == ensemble.single(cfg, params), without device ops
        stacked = {k: jax.device_put(np.asarray(v)[None]) for k, v in params.items()}
        return Ensemble(stacked, jax.device_put(np.ones((1,), np.float32)), cfg)
    man = read_json(path / MANIFEST_FILENAME, "manifest", "re-export the run")
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
