"""Single vs expanded vs bagging vs boosting on synthetic activations with known features (J = 4).

Runs the `saeens` CLI end to end (synthetic -> train -> evaluate -> stability) and writes
experiments/results/synthetic_ensembles.{json,md}. Usage:
    python experiments/synthetic_ensembles.py [--out experiments/results] [--work experiments/work/synthetic]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from saeens import ensemble
from saeens.cli import main
from saeens.tables import format_table
from saeens.synthetic import feature_recovery
from saeens.train import load_ensemble

J, WIDTH, K = 4, 64, 8
COMMON = ["--arch", "topk", "--k", str(K), "--tokens", "300000", "--batch-size", "1024", "--lr", "2e-3", "--quiet"]
METHODS = {"single": ("single", 1, WIDTH), "expanded": ("expanded", J, WIDTH), "bagging": ("bagging", J, WIDTH),
           "boosting": ("boosting", J, WIDTH)}


def run(cmd: list[str]) -> None:
    if main(cmd) != 0:
        raise SystemExit(f"saeens {' '.join(cmd)} failed")


def main_(out: Path, work: Path, seeds: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    acts = work / "acts"
    run(["synthetic", "--out", str(acts), "--d-in", "64", "--features", "512", "--tokens", "200000", "--active", "6"])
    true = np.load(acts / "true_features.npy")
    rows, stab = [], {}
    for name, (method, members, width) in METHODS.items():
        runs = []
        for seed in range(seeds):
            rd = work / f"{name}_{seed}"
            t0 = time.perf_counter()
            run(["train", "--activations", str(acts), "--out", str(rd), "--method", method, "--members", str(members),
                 "--width", str(width), "--seed", str(seed), *COMMON])
            seconds = time.perf_counter() - t0
            runs.append(str(rd))
            if seed == 0:
                ev = work / f"{name}_eval.json"
                run(["evaluate", str(rd), "--activations", str(acts), "--json", str(ev), "--quiet"])
                r = json.loads(ev.read_text())
                ens, _ = load_ensemble(rd)
                r["feature_recovery"] = feature_recovery(true, np.asarray(ensemble.decoder(ens)))
                r["train_seconds"] = seconds
                rows.append({"method": name, **{k: r[k] for k in (
                    "n_features", "explained_variance", "explained_variance_per_token", "mse", "l0",
                    "relative_reconstruction_bias", "dead_fraction", "diversity", "feature_recovery", "train_seconds")}})
        sj = work / f"{name}_stability.json"
        run(["stability", *runs, "--json", str(sj)])
        s = json.loads(sj.read_text())
        s["runs"] = [Path(r).name for r in s["runs"]]  # run names, not this machine's paths
        stab[name] = s
        row = next(r for r in rows if r["method"] == name)
        row["stability"] = s["stability"]
        row["stability_ci"] = f"[{s['stability_ci_low']:.3f}, {s['stability_ci_high']:.3f}]"
        row["hungarian_stability"] = s["hungarian_stability"]
    result = {"setting": {"J": J, "width_per_member": WIDTH, "k": K, "d_in": 64, "true_features": 512,
                          "train_tokens": 300000, "seeds": seeds}, "rows": rows, "stability": stab}
    out.mkdir(parents=True, exist_ok=True)
    (out / "synthetic_ensembles.json").write_text(json.dumps(result, indent=2))
    table = format_table(rows)
    (out / "synthetic_ensembles.md").write_text(
        "# Synthetic activations, J = 4, TopK k = 8\n\n"
        "Regenerate: `python experiments/synthetic_ensembles.py`\n\n" + table + "\n")
    print(table)
    return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--work", type=Path, default=Path(__file__).parent / "work" / "synthetic")
    ap.add_argument("--seeds", type=int, default=4)
    a = ap.parse_args()
    main_(a.out, a.work, a.seeds)
