"""Every experiment in order, resumably: cache -> sparsity probe -> the data policy at the old budget ->
convergence -> table 1 -> table 1 across budgets -> boosting's stages -> probing -> SCR -> Pareto -> J sweep ->
probing and SCR at the first study's budget -> report.
Probing, SCR and Pareto's main-k points evaluate the same seed-0 runs of table 1, so they come
together (a session that must train those runs again trains them once); the J sweep, whose
independent ensembles must all be trained in one session, comes last.

    python -m experiments.run_all --scale full        # the study (see README for the budget)
    python -m experiments.run_all --scale gpu         # the same at >= 30M tokens per SAE, one GPU
    python -m experiments.run_all --scale tiny        # the code path in a few minutes
    python -m experiments.run_all --scale full --estimate   # planned hours per part, nothing trained

The planned training time of each part (measured throughput, experiments/estimate.py) is printed
before anything starts: of the whole study, and of what remains of it (what earlier sessions
committed and what the work directory holds trained cost nothing). Interrupt it at any point and
run the same command again: the cache continues after its last shard, training runs resume from
their last checkpoint (WORK/<scale>/runs/, WORK = $SAEENS_WORK or experiments/work), evaluations
already done are read back (eval-*.json in each run directory), and finished results are skipped.
One process: the model is loaded once. Wall times per script accumulate in <results>/timings.json.
"""

from __future__ import annotations

import json
import time

from experiments import (across_budgets, boosting_stages, common, concept_detection, convergence, data_policy,
                         downstream_budgets, effect_of_j, intrinsic, pareto, report, sparsity_probe, spurious_removal)
from experiments import estimate as planned

STEPS = (("sparsity_probe", sparsity_probe.main), ("data_policy", data_policy.main), ("convergence", convergence.main),
         ("intrinsic", intrinsic.main), ("across_budgets", across_budgets.main), ("boosting_stages", boosting_stages.main),
         ("concept_detection", concept_detection.main), ("spurious_removal", spurious_removal.main),
         ("pareto", pareto.main), ("effect_of_j", effect_of_j.main),
         ("downstream_budgets", downstream_budgets.main), ("report", report.main))


def estimate(scale: common.Scale, d_in: int = 576) -> dict[str, dict[str, float]]:
    """Training TFLOP (dense FLOP model of common.py) that each script adds, split by kind: "topk"
    (TopK runs) and "dense" (ReLU, JumpReLU). The single row is bagging's member 0: no runs of its own."""
    fl = lambda arch, method, J, seed, k=None, tokens=None: common.train_flops(  # noqa: E731
        common.with_tokens(common.run_config(scale, d_in, arch, method, 1 if method == "single" else J, seed, k), tokens),
        scale.cache_tokens) / 1e12
    trained = [m for m in common.METHODS if m != "single"]
    t1 = sum(fl("topk", m, scale.members, s) for m in trained for s in range(scale.seeds))
    dense = sum(fl(a, m, scale.members, s) for a, _ in scale.other_archs for m in trained for s in range(scale.other_seeds))
    pa = sum(fl("topk", m, scale.pareto_members, 0, k) for k in scale.pareto_ks for m in trained
             if k != scale.k or m == "expanded")  # the single SAE: member 0 of its k's bagging run
    cp = convergence.PLANS[scale.name]
    conv = len(convergence.SEEDS) * (
        fl("topk", "single", 1, 0, tokens=cp.single_tokens) + fl("topk", "expanded", scale.members, 0, tokens=cp.expanded_tokens)
        + fl("topk", "bagging", cp.ensemble_members, 0, tokens=cp.ensemble_tokens)
        + sum(fl("topk", "boosting", cp.ensemble_members, 0, tokens=t) for t in cp.points if t <= cp.boosting_max))
    probe = len(sparsity_probe.GRID) * fl("relu", "single", 1, 0)
    policy = {a: 2 * len(data_policy.SEEDS) * sum(fl(a, m, scale.members, 0, tokens=data_policy.budget(scale, a))
                                                  for m in ("single", "expanded")) for a in ("topk", "relu")}
    twins = {a: sum(common.train_flops(run, scale.cache_tokens) / 1e12 for s in range(n) for _, run in
                    across_budgets.boosting_runs(scale, d_in, a, s)[:-1]) for a, n in intrinsic.arch_seeds(scale)}
    return {"sparsity_probe": {"dense": probe}, "data_policy": {"topk": policy["topk"], "dense": policy["relu"]},
            "convergence": {"topk": conv}, "intrinsic": {"topk": t1, "dense": dense},
            "across_budgets": {"topk": twins.pop("topk"), "dense": sum(twins.values())}, "pareto": {"topk": pa},
            # bagging's and the expanded SAE's seed-0 twins (boosting's is across_budgets')
            "downstream_budgets": {"topk": sum(common.train_flops(across_budgets.twin(scale, d_in, "topk", m, 0)[1],
                                                                  scale.cache_tokens) / 1e12
                                               for m in ("expanded", "bagging") if scale.budgets_of("topk"))},
            "boosting_stages": {"topk": sum(common.train_flops(run, scale.cache_tokens) / 1e12
                                            for _, run in boosting_stages.all_residual_runs(scale, d_in))}}


def remaining(scale: common.Scale, d_in: int = 576) -> dict[str, dict[str, float]]:
    """The training TFLOP each part still has to spend, by kind, if the study starts now: the runs of
    results that are not committed (whole results, table 1's rows, boosting's twins, Pareto's points,
    the J sweep's methods) and that the work directory does not hold finished, each counted in the
    first part that trains it. Probing, SCR, Pareto and the J sweep train table 1's runs again when an
    earlier session's machine took them. A half-trained run is counted whole (an upper bound)."""
    from experiments.intrinsic import row_committed, row_run

    seen: set[str] = set()

    def cost(runs) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, run in runs:
            if name in seen or (common.runs_dir(scale) / name / "ensemble.json").is_file():
                continue
            seen.add(name)
            kind = "topk" if run.sae.arch == "topk" else "dense"
            out[kind] = out.get(kind, 0.0) + common.train_flops(run, scale.cache_tokens) / 1e12
        return out

    full = estimate(scale, d_in)
    todo = lambda name: not common.result_complete(scale, name)  # noqa: E731
    out = {name: full[name] if todo(name) else {} for name in ("sparsity_probe", "data_policy", "convergence")}
    table = lambda arch, m, seeds: [row_run(scale, d_in, arch, m, s) for s in range(seeds)]  # noqa: E731
    out["intrinsic"] = cost([r for arch, seeds in intrinsic.arch_seeds(scale) for m in common.METHODS
                             if todo("intrinsic") and not row_committed(scale, arch, m, seeds)
                             for r in table(arch, m, seeds)])
    out["across_budgets"] = cost([t for arch, seeds in intrinsic.arch_seeds(scale) if todo("across_budgets")
                                  for t in across_budgets.twins_to_train(scale, d_in, arch, seeds)])
    out["boosting_stages"] = cost([r for r in [*table("topk", "boosting", 1),  # table 1's boosting seed 0: its stage 1
                                               *boosting_stages.all_residual_runs(scale, d_in, skip_committed=True)]
                                   if todo("boosting_stages")])
    for part in ("concept_detection", "spurious_removal"):  # the seed-0 TopK runs of table 1
        out[part] = cost([r for m in common.METHODS if todo(part) for r in table("topk", m, 1)])
    out["pareto"] = cost([pareto.point_run(scale, d_in, m, k) for k in scale.pareto_ks for m in common.METHODS
                          if todo("pareto") and not pareto.point_path(scale, m, k, scale.spliced_contexts).is_file()])
    swept = common.read_result(scale, effect_of_j.NAME) or {"curves": {}}
    out["effect_of_j"] = cost([row_run(scale, d_in, "topk", m, s) for m in ("bagging", "boosting")
                               if todo("effect_of_j") and m not in swept["curves"]
                               for s in range(len(effect_of_j.committed_seeds(scale, m, swept)),
                                              scale.sweep_seeds or scale.seeds)])
    out["downstream_budgets"] = cost([across_budgets.twin(scale, d_in, "topk", m, 0) for m in common.METHODS
                                      if scale.budgets_of("topk") and any(todo(n) for n in downstream_budgets.NAMES)])
    return out


def print_estimate(scale: common.Scale) -> dict:
    """Measure this machine's throughput at the scale's shapes and print the planned hours per part:
    of the whole study, and of what is left of it (`remaining`)."""
    rates, full, left = planned.measure(scale), estimate(scale), remaining(scale)
    left_hours = {k: v for k, v in planned.plan(left, rates).items() if k != "tflop_per_s"}
    out = {"scale": scale.name, "training_tflop": full, **planned.plan(full, rates),
           "remaining": {"training_tflop": left, **left_hours}}
    print(json.dumps(out, indent=2), flush=True)
    return out


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> None:
    from saeens.io.files import atomic_write_text

    timings_path = common.results_dir(scale) / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    print_estimate(scale)
    t0 = time.perf_counter()
    common.get_cache(scale, progress)
    timings["cache"] = common.cache_seconds(scale)
    for name, fn in STEPS:
        print(f"== {name} ({scale.name})", flush=True)
        t = time.perf_counter()
        fn(scale, force, progress)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        atomic_write_text(timings_path, json.dumps(timings, indent=2))
    print(f"all done in {time.perf_counter() - t0:.0f} s this session; per-script wall times in {timings_path}")


if __name__ == "__main__":
    ap = common.parser(__doc__)
    ap.add_argument("--estimate", action="store_true", help="print the planned hours per part (measured) and exit")
    a = ap.parse_args()
    sc = common.SCALES[a.scale]
    if a.estimate:
        print_estimate(sc)
    else:
        main(sc, a.force, not a.quiet)
