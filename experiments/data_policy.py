"""The massive-activation policy on its own, at the first study's budget.

The first study's SAEs (TopK k = 32 and ReLU, the single SAE of m latents and the expanded one of
J*m, two seeds each, at the first study's 300k / 150k tokens with the scale's batch, lr and
dead_tokens) are trained twice on the scale's cache: on its kept rows (the policy,
saeens/data/outliers.py) and on every row (before the policy: flagged rows included). Each is
evaluated on the kept test rows and on every test row: MSE, per-dimension EV, pooled EV (1 - sum
SSE / sum SST), per-token EV, and the dimensions that drive the per-dimension EV with their
variance shares. This separates what the data policy changes from what the larger budget changes.
Writes <results>/data_policy.{json,md}; runs and evaluations resume.

    python -m experiments.data_policy --scale full      # ~30 min on 2 CPU cores
    python -m experiments.data_policy --scale tiny      # the code path in a minute
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common
from saeens import metrics

NAME = "data_policy"
CELLS = ("mse", "explained_variance", "explained_variance_pooled", "explained_variance_per_token")
SEEDS = (0, 1)


class AllRows:
    """A cache read with its massive-activation flags ignored: every row trains and is scored."""

    def __init__(self, acts: Any):
        self.acts, self.d_in, self.meta, self.path = acts, acts.d_in, acts.meta, acts.path

    def n_rows(self, split: str = "train") -> int:
        return self.acts.n_rows(split)

    def gather(self, idx_N: np.ndarray, split: str = "train") -> np.ndarray:
        return self.acts.gather(idx_N, split)

    def chunks(self, split: str = "test", chunk_rows: int = 8192) -> Iterator[np.ndarray]:
        return self.acts.chunks(split, chunk_rows)


def budget(scale: common.Scale, arch: str) -> int:
    """The first study's budget (the scale's smallest for `arch`); a scale without budgets: its own."""
    own = scale.train_tokens if arch == "topk" else scale.other_train_tokens
    return (scale.budgets_of(arch) or (own,))[0]


def evaluate(scale: common.Scale, ens, rows, path: Path) -> dict[str, Any]:
    from saeens.evals import intrinsic

    return common.cached_json(path, lambda: intrinsic.run(ens, rows, intrinsic.IntrinsicConfig(connectivity=False)).to_dict())


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    data = {"kept": acts, "all": AllRows(acts)}
    rows, runs = [], {}
    for arch in ("topk", "relu"):
        for method in ("single", "expanded"):
            for trained in ("kept", "all"):
                per_seed: dict[str, list[dict[str, Any]]] = {"kept": [], "all": []}
                for seed in SEEDS:
                    run = common.run_config(scale, acts.d_in, arch, method, scale.members, seed)
                    run = common.with_tokens(run, budget(scale, arch))
                    name = f"{NAME}-{trained}-{common.run_name(arch, method, run.ensemble.members, seed, scale.k)}-T{run.train.n_tokens}"
                    ens, info = common.ensure_run(scale, name, run, data[trained], progress)
                    for scored in ("kept", "all"):
                        per_seed[scored].append(evaluate(scale, ens, data[scored], common.run_path(info).with_name(f"{name}.eval-{scored}.json")))
                for scored in ("kept", "all"):
                    row = {"arch": arch, "method": method, "trained_on": trained, "scored_on": scored,
                           "tokens": budget(scale, arch), "n_features": per_seed[scored][0]["n_features"],
                           **{m: metrics.mean_ci([r[m] for r in per_seed[scored]]) for m in CELLS}}
                    rows.append(row)
                    runs[f"{arch}/{method}/{trained}/{scored}"] = per_seed[scored]
    flagged = {s: (acts.meta.get("outliers") or {}).get("splits", {}).get(s, {}).get("flagged") for s in ("train", "test")}
    result = {"scale": scale.name, "hook": common.hook(), "seeds": list(SEEDS), "flagged_rows": flagged,
              "outlier_policy": acts.meta.get("outliers"), "rows": rows, "runs": runs}
    common.write_result(scale, NAME, result, markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import ev_drivers_line, format_table

    table = [{"arch": r["arch"], "method": r["method"], "features": r["n_features"], "tokens": r["tokens"],
              "trained on": r["trained_on"], "scored on": r["scored_on"],
              **{m: common.fmt_ci(r[m]["mean"], r[m]["ci_low"], r[m]["ci_high"]) for m in CELLS}} for r in result["rows"]]
    fl = result["flagged_rows"]
    lines = [f"# The massive-activation policy at the first study's budget ({result['hook']})", "",
             f"Rows flagged by the cache's policy: {fl['train']} training, {fl['test']} test. Trained on the kept rows "
             f"(the policy) or on every row (before it); scored on the kept test rows or on every test row. Mean "
             f"[95% t interval] over seeds {result['seeds']}.", "",
             f"Regenerate: `python -m experiments.data_policy --scale {result['scale']}`", "", format_table(table), "",
             "What drives the per-dimension EV (seed 0; saeens.metrics.ev_drivers):", ""]
    for key, per_seed in result["runs"].items():
        arch, method, trained, scored = key.split("/")
        lines.append(f"- {arch} {method}, trained on {trained} rows, scored on {scored}: {ev_drivers_line(per_seed[0])}")
    return "\n".join(lines)


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
