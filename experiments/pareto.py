"""Figure 3: sparsity-fidelity fronts (L0 vs FVU, L0 vs delta LM loss), TopK at several k.

Single SAE, expanded SAE (J*m latents, same k: its L0 is k), bagging and boosting (J = pareto_members
members of m latents: their L0 is the SUM of the members' L0, about J*k) for k in pareto_ks, seed 0.
At the table's k the single SAE is table 1's, and bagging/boosting are the first pareto_members
members/stages of table 1's seed-0 ensembles (a prefix is an ensemble of that size); the other
points are trained here, the single SAE at another k being member 0 of that k's bagging run (as in
table 1: it costs no run of its own). Each point's record is committable as soon as it is evaluated
(results/pareto/<method>-k<k>-J<J>-<contexts>ctx.json) and is read back, not retrained, by a later
session. Writes results/pareto.{json,md,png}.

    python -m experiments.pareto --scale full
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from experiments import common
from experiments.intrinsic import member_zero, table_run
from saeens import ensemble

NAME = "pareto"


def from_table(scale: common.Scale, method: str, k: int) -> bool:
    """At the table's k, the single, bagging and boosting points come from table 1's seed-0 runs."""
    return k == scale.k and method in ("single", "bagging", "boosting") and scale.pareto_members <= scale.members


def point_run(scale: common.Scale, d_in: int, method: str, k: int) -> tuple[str, Any]:
    """(name, run) of the run a point's ensemble comes from (the single SAE: the bagging run whose
    member 0 it is)."""
    source = "bagging" if method == "single" else method
    J = scale.members if from_table(scale, method, k) else scale.pareto_members
    return common.run_name("topk", source, J, 0, k), common.run_config(scale, d_in, "topk", source, J, 0, k=k)


def point_ensemble(scale: common.Scale, acts, method: str, k: int, progress: bool):
    J = scale.pareto_members
    if from_table(scale, method, k):
        ens, info = table_run(scale, acts, "topk", method, 0, progress)
        if method == "single":
            return ens, info
        equivalent = common.run_config(scale, acts.d_in, "topk", method, J, 0)  # what a J-member run costs
        return ensemble.prefix(ens, J), {**info, "sliced_from": scale.members, "train_seconds": float("nan"),
                                       "train_flops": common.train_flops(equivalent, acts.n_rows("train"))}
    if method == "single":
        return member_zero(*point_ensemble(scale, acts, "bagging", k, progress))
    return common.ensure_run(scale, *point_run(scale, acts.d_in, method, k), acts, progress)


def point_members(scale: common.Scale, method: str) -> int:
    """J of a point (the expanded SAE: J*m latents in one SAE)."""
    return 1 if method == "single" else scale.pareto_members


def point_path(scale: common.Scale, method: str, k: int, contexts: int) -> Path:
    """One point's committable record, read back by a later session instead of training its run again."""
    return common.results_dir(scale) / NAME / f"{method}-k{k}-J{point_members(scale, method)}-{contexts}ctx.json"


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    spliced = common.Spliced(scale, scale.spliced_contexts)
    points: dict[str, list[dict[str, Any]]] = {m: [] for m in common.METHODS}
    for k in scale.pareto_ks:
        for method in common.METHODS:
            def compute(method=method, k=k):
                ens, info = point_ensemble(scale, acts, method, k, progress)
                return {**common.intrinsic_metrics(ens, acts, scale), **spliced.fast(ens), **info}

            path = point_path(scale, method, k, spliced.contexts.shape[0])
            points[method].append({"k": k, "J": point_members(scale, method), **common.cached_json(path, compute)})
    result = {"scale": scale.name, "hook": common.hook(), "members": scale.pareto_members, "width": scale.width,
              "ks": list(scale.pareto_ks), "spliced_contexts": scale.spliced_contexts, "points": points}
    common.write_result(scale, NAME, result, markdown(result))
    from saeens.plots import pareto

    pareto(points, [("l0", "fvu"), ("l0", "delta_lm_loss")], common.results_dir(scale) / f"{NAME}.png",
           title=f"{result['hook']}: TopK, J={scale.pareto_members}, m={scale.width} per member (labels: k)")
    return result


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import format_table

    rows = [{"method": m, "k": p["k"], "J": p["J"], "features": p["n_features"], "l0": p["l0"], "fvu": p["fvu"],
             "explained_variance": p["explained_variance"], "delta_lm_loss": p["delta_lm_loss"],
             "loss_recovered": p["loss_recovered"], "dead_fraction": p["dead_fraction"],
             "train_TFLOP": p["train_flops"] / 1e12}
            for m, pts in result["points"].items() for p in pts]
    return "\n".join([
        f"# Figure 3: sparsity vs fidelity (TopK, J = {result['members']}, {result['width']} latents per member)", "",
        "L0 of an ensemble is the sum over members; the expanded SAE keeps k active latents of J*m. "
        "At the main k, bagging/boosting are prefixes of table 1's seed-0 ensembles (train_TFLOP: what a "
        "J-member run costs; no wall time). Plot: pareto.png.", "",
        f"Regenerate: `python -m experiments.pareto --scale {result['scale']}`", "", format_table(rows)])


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
