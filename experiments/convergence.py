"""Convergence evidence: how far from its plateau each method is at each token budget.

The single TopK SAE (m = width, k) and the expanded one (m = J x width) are trained far past the
study's budget, two seeds each, and evaluated on the cache's held-out tokens at log-spaced points
of the SAME runs as they train (experiments/budgets.py: constant lr, batch and dead_tokens fixed,
so the state at S steps is that of an S-step run): FVU both ways (1 - the per-dimension explained
variance, and 1 - the per-token one), MSE, delta LM loss, dead fraction, and the stability between
the two seeds at that point (beside its chance level). Bagging at J = 4 is evaluated the same way;
boosting's stage length is its budget, so it is one run per point, up to `boosting_max` tokens.
Steps are reported beside tokens. Resumable: every evaluation is cached in its run directory and
copied to <results>/budgets/. Writes <results>/convergence.{json,md,png}.

    python -m experiments.convergence --scale full      # hours on CPU (README: estimate)
    python -m experiments.convergence --scale tiny      # the code path in a few minutes
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from experiments import common
from experiments.budgets import decoder_path, evals_dir, train_with_budgets
from saeens import metrics

NAME = "convergence"
SEED_METRICS = ("fvu", "fvu_pooled", "fvu_per_token", "mse", "delta_lm_loss", "dead_fraction")  # per run, mean over seeds
CURVE_METRICS = (*SEED_METRICS, "stability", "stability_over_chance")


@dataclasses.dataclass(frozen=True)
class Plan:
    single_tokens: int  # the single SAE's (and its points') largest budget
    expanded_tokens: int
    ensemble_tokens: int  # bagging / boosting at J = ensemble_members
    boosting_max: int  # boosting runs only at points up to this budget (one run per point)
    ensemble_members: int
    points: tuple[int, ...]  # log-spaced budgets evaluated on the way


PLANS = {
    "tiny": Plan(single_tokens=16_384, expanded_tokens=8192, ensemble_tokens=8192, boosting_max=4096,
                 ensemble_members=2, points=(1024, 2048, 4096, 8192, 16_384)),
    "full": Plan(single_tokens=30_000_000, expanded_tokens=10_000_000, ensemble_tokens=3_000_000,
                 boosting_max=1_000_000, ensemble_members=4,
                 points=(100_000, 300_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000)),
    "gpu": Plan(single_tokens=100_000_000, expanded_tokens=30_000_000, ensemble_tokens=30_000_000,
                boosting_max=10_000_000, ensemble_members=4,
                points=(300_000, 1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000)),
}
SEEDS = (0, 1)


def _run(scale: common.Scale, d_in: int, method: str, J: int, seed: int, tokens: int):
    run = common.run_config(scale, d_in, "topk", method, J, seed)
    run = common.with_tokens(run, tokens)
    return f"{NAME}-{common.run_name('topk', method, J, seed, scale.k)}-T{tokens}", run


def _evaluate(scale, acts, spliced: common.Spliced):
    def evaluate(ens, steps: int) -> dict[str, Any]:
        m = {**common.intrinsic_metrics(ens, acts, scale), **spliced.fast(ens)}
        return {**m, "fvu_per_token": 1.0 - m["explained_variance_per_token"],
                "fvu_pooled": 1.0 - m["explained_variance_pooled"]}

    return evaluate


def curve(scale, acts, spliced, method: str, J: int, tokens: int, points: tuple[int, ...], progress: bool
          ) -> dict[str, Any]:
    """Both seeds of one method to `tokens`, evaluated at `points`; per point the mean over the seeds
    (with its t interval) and the stability between them beside its chance level."""
    per_seed, dirs = [], []
    for seed in SEEDS:
        name, run = _run(scale, acts.d_in, method, J, seed, tokens)
        dirs.append(evals_dir(scale, name))
        per_seed.append(train_with_budgets(scale, name, run, acts, points, _evaluate(scale, acts, spliced),
                                           progress))
    return summarize(per_seed, dirs)


def boosting_curve(scale, acts, spliced, J: int, points: tuple[int, ...], progress: bool) -> dict[str, Any]:
    """Boosting at J: one run per point (its stage length is the budget)."""
    per_seed, dirs = [[] for _ in SEEDS], []
    for t in points:
        for i, seed in enumerate(SEEDS):
            name, run = _run(scale, acts.d_in, "boosting", J, seed, t)
            dirs.append(evals_dir(scale, name))
            per_seed[i] += train_with_budgets(scale, name, run, acts, (), _evaluate(scale, acts, spliced),
                                              progress)
    return summarize(per_seed, [dirs[i::len(SEEDS)] for i in range(len(SEEDS))])


def summarize(per_seed: list[list[dict[str, Any]]], dirs: list) -> dict[str, Any]:
    """Per point: steps, tokens, mean [t interval] of each metric over seeds, stability and its chance."""
    n = min(len(r) for r in per_seed)
    out: dict[str, Any] = {"steps": [], "tokens": [], **{m: {"mean": [], "ci_low": [], "ci_high": []} for m in CURVE_METRICS}}
    for i in range(n):
        recs = [r[i] for r in per_seed]
        out["steps"].append(recs[0]["steps"])
        out["tokens"].append(recs[0]["tokens"])
        for m in SEED_METRICS:
            ci = metrics.mean_ci([r[m] for r in recs])
            for key in ("mean", "ci_low", "ci_high"):
                out[m][key].append(ci[key])
        decs = [np.load(decoder_path(d if not isinstance(d, list) else d[i], recs[0]["steps"])) for d in dirs]
        s = metrics.stability(decs)
        chance = metrics.stability_chance([len(W) for W in decs], decs[0].shape[1])["stability"]
        for m, v in (("stability", s), ("stability_over_chance", None)):
            val = metrics.over_chance(s["mean"], chance) if v is None else v["mean"]
            out[m]["mean"].append(val)
            out[m]["ci_low"].append(float("nan"))  # two seeds: one pair, no interval
            out[m]["ci_high"].append(float("nan"))
        out.setdefault("stability_chance", []).append(chance)
        out.setdefault("ev_drivers_seed0", []).append(recs[0].get("ev_drivers", []))
    return out


def main(scale: common.Scale, force: bool = False, progress: bool = True, ensembles: bool = True) -> dict | None:
    if common.result_done(scale, NAME, force):
        return None
    plan = PLANS[scale.name]
    acts = common.get_cache(scale, progress)
    spliced = common.Spliced(scale, scale.sweep_spliced_contexts)
    below = lambda T: tuple(p for p in plan.points if p <= T)  # noqa: E731
    J = plan.ensemble_members
    parts = [("single", lambda: curve(scale, acts, spliced, "single", 1, plan.single_tokens, below(plan.single_tokens), progress)),
             ("expanded", lambda: curve(scale, acts, spliced, "expanded", scale.members, plan.expanded_tokens,
                                        below(plan.expanded_tokens), progress))]
    if ensembles:
        parts += [(f"bagging J={J}", lambda: curve(scale, acts, spliced, "bagging", J, plan.ensemble_tokens,
                                                   below(plan.ensemble_tokens), progress)),
                  (f"boosting J={J}", lambda: boosting_curve(scale, acts, spliced, J, below(plan.boosting_max), progress))]
    result = {"scale": scale.name, "hook": common.hook(), "plan": dataclasses.asdict(plan), "seeds": list(SEEDS),
              "width": scale.width, "k": scale.k, "expanded_width": scale.members * scale.width,
              "batch_size": scale.batch_size, "lr": scale.lr, "dead_tokens": scale.dead_tokens,
              "study_tokens": scale.train_tokens, "curves": {}, "complete": False}
    for i, (name, compute) in enumerate(parts):  # each finished curve is written (and can be committed) at once
        result["curves"][name] = compute()
        result["complete"] = i == len(parts) - 1
        common.write_result(scale, NAME, result, markdown(result))
        plot(result, common.results_dir(scale) / f"{NAME}.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import ev_drivers_line, format_table

    lines = [f"# Convergence: TopK k = {result['k']} at {result['hook']}", "",
             f"Two seeds per method, evaluated on the held-out tokens at log-spaced budgets of the same runs "
             f"(batch {result['batch_size']}, lr {result['lr']}, dead_tokens {result['dead_tokens']} fixed). "
             f"The study trains {result['study_tokens']} tokens per SAE. fvu = 1 - per-dimension EV, "
             "fvu_pooled = sum SSE / sum SST (variance-weighted), fvu_per_token = 1 - per-token EV; stability "
             "between the two seeds, beside its chance level (random unit vectors of the same counts).", "",
             f"Regenerate: `python -m experiments.convergence --scale {result['scale']}`", ""]
    if not result.get("complete", True):
        lines += [f"Partial: the curves that have finished so far ({', '.join(result['curves'])}); the run "
                  "resumes with the same command.", ""]
    for name, c in result["curves"].items():
        rows = [{"steps": s, "tokens": t, **{m: c[m]["mean"][i] for m in CURVE_METRICS},
                 "chance": c["stability_chance"][i]} for i, (s, t) in enumerate(zip(c["steps"], c["tokens"]))]
        lines += [f"## {name}", "", format_table(rows), ""]
        if c.get("ev_drivers_seed0") and c["ev_drivers_seed0"][-1]:
            last = {"explained_variance": 1.0 - c["fvu"]["mean"][-1], "explained_variance_pooled": 1.0 - c["fvu_pooled"]["mean"][-1],
                    "ev_drivers": c["ev_drivers_seed0"][-1]}
            lines += [f"At {c['tokens'][-1]} tokens (EVs: mean over seeds; dimensions: seed 0): {ev_drivers_line(last)}", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], out) -> None:
    from saeens.plots import curves_with_bands

    series = {name: {m: {"x": c["tokens"], **c[m]} for m in CURVE_METRICS} for name, c in result["curves"].items()}
    curves_with_bands(series, list(CURVE_METRICS), out, xlabel="training tokens", xscale="log",
                      title=f"{result['hook']}: TopK k={result['k']}, mean over {len(result['seeds'])} seeds")


if __name__ == "__main__":
    ap = common.parser(__doc__)
    ap.add_argument("--no-ensembles", action="store_true", help="only the single and expanded SAEs")
    a = ap.parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet, not a.no_ensembles)
