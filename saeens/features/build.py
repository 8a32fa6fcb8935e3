"""`saeens features`: runs + a cache (+ a model) -> per-run JSON, the static dashboard and, for
relu / jumprelu / batchtopk bagging, the consensus ensemble exported as one SAELens SAE.

DIR/features.json                  the runs and their consensus metrics (also marks DIR as ours)
DIR/<run>/features.json            `analyse`'s record of the run
DIR/<run>/consensus_sae/           cfg.json + sae_weights.safetensors (bagging of one-SAE archs only)
DIR/index.html, DIR/<run>/...      the dashboard (saeens/features/dashboard.py)
Every run is matched against all the others given (its "other runs"): pass independently trained
runs of one configuration (different seeds) to read the stability column as the paper's.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from saeens import ensemble
from saeens.data.cache import ActivationCache
from saeens.errors import SaeensError
from saeens.features.agreement import consensus_sae
from saeens.features.analysis import FeaturesConfig, analyse
from saeens.features.dashboard import write_dashboard
from saeens.io.files import atomic_write_json, read_json
from saeens.runs import load_ensemble

SUMMARY = "features.json"
FORMAT = "saeens-features"


def run_names(runs: list[str | Path]) -> list[str]:
    """Directory names, made unique with a numeric suffix (two runs called 'bagging' -> bagging, bagging-2)."""
    names: list[str] = []
    for r in runs:
        base = Path(r).resolve().name or "run"
        name, i = base, 1
        while name in names:
            i += 1
            name = f"{base}-{i}"
        names.append(name)
    return names


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise SaeensError(f"{out} is a file: pass a new directory to --out")
    if out.is_dir() and any(out.iterdir()):
        summary = out / SUMMARY
        if not summary.is_file() or read_json(summary, "features summary", "pass a new --out").get("format") != FORMAT:
            raise SaeensError(f"{out} is not empty and holds no `saeens features` output: pass a new --out (nothing was written)")


def export_consensus(out: Path, ens: ensemble.Ensemble, rec: dict[str, Any], acts_meta: dict[str, Any]) -> str:
    """The consensus SAE at out (replacing an older one atomically); returns out's name or why not."""
    from saeens.io.saelens import saelens_cfg, saelens_tensors, write_sae

    if ens.sequential or ens.cfg.arch == "topk" or ens.n_members < 2:
        return "not exported: only bagging of two or more relu, jumprelu or batchtopk members is one SAE with a consensus"
    cons = rec["consensus"]
    keep_F = np.zeros(ens.width, bool)
    keep_F[cons["kept_features"]] = True
    cfg, params = consensus_sae(ens, keep_F)
    tensors, extra = saelens_tensors(cfg, params)
    meta = {"model_name": acts_meta.get("model"), "hook_name": acts_meta.get("hook"), "saeens_role": "consensus",
            "saeens_members": ens.n_members, "saeens_consensus_t": cons["t"], "saeens_kept_features": cons["kept_features"]}
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
    try:
        write_sae(tmp, saelens_cfg(cfg, meta), tensors, extra)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out.name


def build(runs: list[str | Path], activations: str | Path, out: str | Path, model: str | None = None,
          cfg: FeaturesConfig = FeaturesConfig(), progress: bool = True) -> dict[str, Any]:
    """Analyse every run on the cache and write DIR (see the module docstring); returns the summary.

    model: a model name or path for the text and the logit effects; None: the cache's model when it
    records one, "none": no model (token ids as text, no logit effects)."""
    out = Path(out)
    _check_out(out)
    if not runs:
        raise SaeensError("no run given: pass one or more run directories")
    acts = ActivationCache(activations)
    loaded = [load_ensemble(r) for r in runs]
    names = run_names(runs)
    name = acts.meta.get("model") if model is None else (None if model == "none" else model)
    lm, tokenizer = (None, None)
    if name is not None:
        from saeens.models import load_model

        lm, tokenizer = load_model(name)
    decoders = [ensemble.decoder(ens) for ens, _ in loaded]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SUMMARY, {"format": FORMAT, "runs": []})  # marks DIR as ours from the start
    records = []
    for i, ((ens, meta), run_name) in enumerate(zip(loaded, names)):
        others = [(names[j], decoders[j]) for j in range(len(loaded)) if j != i]
        info = {"name": run_name, "method": meta.get("method"), "seed": meta.get("seed"),
                "model": name, "hook": acts.meta.get("hook")}
        if progress:
            print(f"features of {run_name} ({meta.get('method')}, {ens.width} features)")
        rec = analyse(ens, info, acts, others, cfg, lm, tokenizer, progress)
        (out / run_name).mkdir(exist_ok=True)
        rec["consensus"]["export"] = export_consensus(out / run_name / "consensus_sae", ens, rec, acts.meta)
        atomic_write_json(out / run_name / "features.json", rec, indent=None)  # compact: it holds every token shown
        records.append(rec)
    write_dashboard(out, records)
    summary = {"format": FORMAT, "runs": [{k: r[k] for k in ("name", "method", "seed", "n_features", "split", "n_tokens",
                                                             "pass_seconds", "tokens_per_second", "selection", "consensus")}
                                          for r in records]}
    for r in summary["runs"]:
        r["consensus"] = {k: v for k, v in r["consensus"].items() if k != "kept_features"}
    atomic_write_json(out / SUMMARY, summary)
    return summary
