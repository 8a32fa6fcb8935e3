"""Table 1's comparisons at the first study's budget, at a third of the new one and at the new one:
which of the study's agreements and disagreements with the paper persist, appear, vanish or flip
as the budget grows, with the same seeds at every budget.

Single, expanded and bagging are table 1's own runs, evaluated as they trained at the scale's
smaller budgets (experiments/intrinsic.py, budgets.py: with constant lr, batch and dead_tokens the
state at S steps is that of an S-step run; the single SAE is bagging's member 0, its decoder the
first `width` rows of bagging's). Boosting's stage length is its budget, so it trains runs of its
own at the first study's budget (twins: the same seeds) and has no point in between. A run that
passed the first budget before its decoder was kept there (TopK's, trained before budget evaluations
kept decoders) gets a twin too, for stability there; the twin's MSE is recorded beside the run's own
evaluation at that step, which it must equal (one computation). Per point: mean
[95% t] over the independent runs of each metric, and stability between the runs beside its chance
level. Each comparison of CLAIMS is judged per budget by experiments/uncertainty.compare (disjoint
intervals or "no difference") and its movement by `change`; the gap between the means says whether
it narrows or widens. Writes <results>/across_budgets.{json,md}.

    python -m experiments.across_budgets --scale full     # after table 1; trains boosting at the old budget
"""

from __future__ import annotations

from typing import Any

import numpy as np

from experiments import common
from experiments.budgets import budget_steps, decoder_path, evals_dir, read_record, train_with_budgets
from experiments.intrinsic import arch_seeds, budget_evaluator, budget_stability, vectors_committed, vectors_prefix
from experiments.uncertainty import NO_DIFFERENCE, change, compare
from saeens import metrics

NAME = "across_budgets"
METRICS = ("mse", "explained_variance", "explained_variance_pooled", "explained_variance_per_token", "delta_lm_loss",
           "dead_fraction", "l0")
# (metric, a, b, the paper's direction of a against b, what is claimed): the paper's table 1 claims, and
# the first study's "expanded below single", which the data policy traced to 60 test rows
CLAIMS = (
    ("explained_variance", "boosting", "expanded", "higher", "boosting reconstructs best (paper: EV 0.998 vs 0.987)"),
    ("mse", "boosting", "expanded", "lower", "boosting reconstructs best (MSE)"),
    ("explained_variance", "boosting", "bagging", "higher", "boosting reconstructs better than bagging"),
    ("explained_variance", "expanded", "bagging", "higher", "bagging trails the expanded SAE on reconstruction"),
    ("stability", "bagging", "expanded", "higher", "bagging is far more stable than the expanded SAE (~0.6-0.75 vs 0.2-0.37)"),
    ("stability", "boosting", "expanded", "higher", "boosting is far more stable than the expanded SAE"),
    ("mse", "expanded", "single", "lower", "the expanded SAE (J x the latents) reconstructs better than a single SAE"),
)


def twin(scale: common.Scale, d_in: int, arch: str, method: str, seed: int) -> tuple[str, Any] | None:
    """(name, run) of table 1's run of this method (single: bagging's) trained again, the same seed,
    to the first budget only (as many steps per SAE / stage as the other methods' evaluation there);
    None when the scale has no smaller budget."""
    source = "bagging" if method == "single" else method
    name = common.run_name(arch, source, scale.members, seed, scale.k)
    run = common.run_config(scale, d_in, arch, source, scale.members, seed)
    if not scale.budgets_of(arch):
        return None
    tokens = budget_steps(run, scale.budgets_of(arch))[0] * scale.batch_size
    return f"{name}-T{tokens}", common.with_tokens(run, tokens)


def boosting_runs(scale: common.Scale, d_in: int, arch: str, seed: int) -> list[tuple[str, Any]]:
    """(name, run) of boosting's twin at the first budget (when the scale has one) and of table 1's
    boosting run."""
    own = (common.run_name(arch, "boosting", scale.members, seed, scale.k),
           common.run_config(scale, d_in, arch, "boosting", scale.members, seed))
    return [t for t in (twin(scale, d_in, arch, "boosting", seed),) if t] + [own]


def twin_stability_committed(scale: common.Scale, arch: str, twin, seeds: int) -> bool:
    """The stability of boosting's twins at this twin's budget is committed (else they are trained
    again for their decoders)."""
    return vectors_committed(vectors_prefix(scale, arch, "boosting", twin.train.n_steps * scale.batch_size), seeds)


def needs_twin(scale: common.Scale, d_in: int, arch: str, method: str, seed: int, seeds: int) -> bool:
    """Single, expanded, bagging: this seed's run passed the first budget (its evaluation there
    exists) without keeping its decoder, and the stability there is not committed, so a twin is
    trained for it (boosting: twin_stability_committed)."""
    t = twin(scale, d_in, arch, method, seed)
    if t is None or method == "boosting":
        return False
    name = common.run_name(arch, "bagging" if method == "single" else method, scale.members, seed, scale.k)
    steps, tokens = t[1].train.n_steps, t[1].train.n_steps * scale.batch_size
    return (read_record(scale, name, steps) is not None and not decoder_path(evals_dir(scale, name), steps).is_file()
            and not vectors_committed(vectors_prefix(scale, arch, method, tokens), seeds))


def twins_to_train(scale: common.Scale, d_in: int, arch: str, seeds: int) -> list[tuple[str, Any]]:
    """(name, run) of every twin this architecture still has to train (one per source run: the
    single SAE's twin is bagging's)."""
    out = {}
    for s in range(seeds):
        *boost, _ = boosting_runs(scale, d_in, arch, s)
        out.update((n, r) for n, r in boost if not twin_stability_committed(scale, arch, r, seeds))
        out.update(twin(scale, d_in, arch, m, s) for m in ("single", "expanded", "bagging")
                   if needs_twin(scale, d_in, arch, m, s, seeds))
    return list(out.items())


def records(scale: common.Scale, acts, spliced: common.Spliced, arch: str, method: str, seed: int, seeds: int,
            progress: bool) -> list[dict[str, Any]]:
    """One record per budget of this run (steps, tokens, the metrics, `decoder`: its saved decoder),
    ascending; runs that are not trained yet are trained (table 1's own, or a twin). seeds: the
    point's independent runs (a twin is trained again for its decoder until their stability is
    committed)."""
    evaluate = lambda n: budget_evaluator(scale, acts, spliced, n)  # noqa: E731
    if method == "boosting":  # a twin whose stability is not committed yet is trained again for its decoder
        twins = boosting_runs(scale, acts.d_in, arch, seed)
        return [r for i, (name, run) in enumerate(twins) for r in _with_decoders(scale, name, train_with_budgets(
            scale, name, run, acts, (), evaluate(name), progress,
            decoders=i < len(twins) - 1 and not twin_stability_committed(scale, arch, run, seeds)))]
    source = "bagging" if method == "single" else method
    name = common.run_name(arch, source, scale.members, seed, scale.k)
    run = common.run_config(scale, acts.d_in, arch, source, scale.members, seed)
    recs = train_with_budgets(scale, name, run, acts, scale.budgets_of(arch), evaluate(name), progress)
    if method == "single":  # bagging's member 0: its metrics, the first `width` rows of bagging's decoder
        recs = [{**r["single"], "steps": r["steps"], "tokens": r["tokens"], "member_rows": scale.width} for r in recs]
    recs = _with_decoders(scale, name, recs)
    if needs_twin(scale, acts.d_in, arch, method, seed, seeds):
        recs[0] = with_twin_decoder(scale, acts, arch, method, seed, recs[0], progress)
    return recs


def with_twin_decoder(scale: common.Scale, acts, arch: str, method: str, seed: int, rec: dict[str, Any],
                      progress: bool) -> dict[str, Any]:
    """The first budget's record with its twin's decoder there (the twin is trained, evaluated for
    its MSE and kept, unless an earlier call did)."""
    name, run = twin(scale, acts.d_in, arch, method, seed)
    (own,) = train_with_budgets(scale, name, run, acts, (), lambda ens, steps: common.intrinsic_metrics(ens, acts, scale),
                                progress, decoders=True)
    if own["steps"] != rec["steps"]:
        raise RuntimeError(f"{name} stops at step {own['steps']}, its run's first budget at {rec['steps']}")
    return {**rec, "decoder": decoder_path(evals_dir(scale, name), rec["steps"])}


def twin_check(scale: common.Scale, d_in: int, arch: str, seeds: int) -> list[dict[str, Any]]:
    """Each non-boosting twin's MSE beside its run's own evaluation at the same step: equal, since a
    run's state after S steps is that of an S-step run (experiments/budgets.py)."""
    out = []
    for s in range(seeds):
        for method in ("expanded", "bagging"):
            t = twin(scale, d_in, arch, method, s)
            mine = read_record(scale, t[0], t[1].train.n_steps) if t else None
            if mine is None:
                continue
            run = common.run_name(arch, method, scale.members, s, scale.k)
            theirs = read_record(scale, run, mine["steps"])
            out.append({"twin": t[0], "run": run, "steps": mine["steps"], "mse_twin": mine["mse"],
                        "mse_run": theirs["mse"], "rel_diff": abs(mine["mse"] - theirs["mse"]) / abs(theirs["mse"])})
    return out


def _with_decoders(scale: common.Scale, name: str, recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each record with the path of the decoder its evaluation kept."""
    return [{**r, "decoder": decoder_path(evals_dir(scale, name), r["steps"])} for r in recs]


def point(scale: common.Scale, arch: str, method: str, recs: list[dict[str, Any]], d_in: int) -> dict[str, Any]:
    """One method at one budget over its independent runs: mean [t interval] of each metric, and
    stability where the runs' decoders there (or their committed vectors) are at hand."""
    out: dict[str, Any] = {"steps": recs[0]["steps"], "tokens": recs[0]["tokens"], "runs": len(recs)}
    for m in METRICS:
        out[m] = metrics.mean_ci([r[m] for r in recs])
    if len(recs) >= 2:
        out.update(budget_stability(scale, arch, method, recs, d_in))
    return out


def _ci(p: dict[str, Any], metric: str) -> dict[str, float]:
    if metric == "stability":
        return {"mean": p.get("stability", float("nan")), "ci_low": p.get("stability_ci_low", float("nan")),
                "ci_high": p.get("stability_ci_high", float("nan"))}
    return p[metric]


def judge(points: list[dict[str, Any]], metric: str, a: str, b: str, paper: str) -> dict[str, Any]:
    """The comparison of a against b at each budget (agrees / disagrees with the paper / no difference),
    its movement from the first budget to the last, and the gap (a - b) at each."""
    per, gaps, raw = [], [], []
    for p in points:
        if a not in p["methods"] or b not in p["methods"]:
            continue
        ca, cb = _ci(p["methods"][a], metric), _ci(p["methods"][b], metric)
        if not (np.isfinite(ca["mean"]) and np.isfinite(cb["mean"])):  # e.g. stability whose decoders were not kept
            per.append({"tokens": p["tokens"], "steps": p["steps"], "gap": float("nan"), "verdict": "not measured"})
            continue
        v = compare(ca, cb)
        raw.append(v)
        gaps.append(ca["mean"] - cb["mean"])
        per.append({"tokens": p["tokens"], "steps": p["steps"], "gap": gaps[-1],
                    "verdict": NO_DIFFERENCE if v == NO_DIFFERENCE else "agrees" if v == paper else "disagrees"})
    if len(raw) < 2:
        return {"per_budget": per, "change": "n/a", "gap_trend": "n/a"}
    finite = all(np.isfinite(g) for g in (gaps[0], gaps[-1]))
    trend = "n/a" if not finite else "narrows" if abs(gaps[-1]) < abs(gaps[0]) else "widens"
    if finite and np.sign(gaps[-1]) != np.sign(gaps[0]):
        trend = "changes sign"
    return {"per_budget": per, "change": change(raw[0], raw[-1]), "gap_trend": trend}


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    spliced = common.Spliced(scale, scale.spliced_contexts)  # table 1's contexts: its evaluations are reused
    archs: dict[str, Any] = {}
    for arch, seeds in arch_seeds(scale):
        per_method = {m: [records(scale, acts, spliced, arch, m, s, seeds, progress) for s in range(seeds)]
                      for m in common.METHODS}
        steps = sorted({r["steps"] for runs in per_method.values() for r in runs[0]})
        points = []
        for st in steps:
            at = {m: [r for runs in per_method[m] for r in runs if r["steps"] == st] for m in common.METHODS}
            at = {m: point(scale, arch, m, recs, acts.d_in) for m, recs in at.items() if recs and len(recs) == seeds}
            points.append({"steps": st, "tokens": st * scale.batch_size, "methods": at})
        claims = [{"metric": metric, "a": a, "b": b, "paper": paper, "claim": claim,
                   **judge(points, metric, a, b, paper)} for metric, a, b, paper, claim in CLAIMS]
        archs[arch] = {"seeds": seeds, "points": points, "claims": claims,
                       "twins": twin_check(scale, acts.d_in, arch, seeds)}
    result = {"scale": scale.name, "hook": common.hook(), "members": scale.members, "archs": archs}
    common.write_result(scale, NAME, result, markdown(result))
    return result


def claim_lines(result: dict[str, Any]) -> list[str]:
    """One line per architecture and claim: the verdict at each budget and how it moved."""
    out = []
    for arch, a in result["archs"].items():
        for c in a["claims"]:
            if not c["per_budget"]:
                continue
            steps = "; ".join(f"{p['tokens']:,} tokens: {p['verdict']}" + (f" (gap {p['gap']:+.3g})" if np.isfinite(p["gap"]) else "")
                              for p in c["per_budget"])
            out.append(f"- {arch}, {c['claim']} ({c['metric']}, {c['a']} vs {c['b']}, {a['seeds']} runs): {steps}. "
                       f"Movement: {c['change']}, gap {c['gap_trend']}.")
    return out


def stage_lines(result: dict[str, Any]) -> list[str]:
    """Boosting's stability per stage at each budget where it was measured: whether the later stages,
    whose features other runs do not reproduce, move toward stage 1 as the budget grows."""
    out = []
    for arch, a in result["archs"].items():
        at = [(p["tokens"], p["methods"]["boosting"]) for p in a["points"]
              if "stability_per_member" in p["methods"].get("boosting", {})]
        if at:
            out.append(f"- {arch}, boosting's stability of each stage's features ({a['seeds']} runs): " + "; ".join(
                f"{tokens:,} tokens: {' / '.join(f'{v:.3g}' for v in b['stability_per_member'])} (chance "
                f"{b['stability_chance']:.3g})" for tokens, b in at) + ".")
    return out


def finding_lines(result: dict[str, Any]) -> list[str]:
    """What the report writes: each claim across budgets, then boosting's stages across budgets."""
    return claim_lines(result) + stage_lines(result)


def twin_lines(result: dict[str, Any]) -> list[str]:
    """Where a first budget's stability came from twins, and how closely they retrace their runs."""
    out = []
    for arch, a in result["archs"].items():
        if a.get("twins"):
            worst = max(t["rel_diff"] for t in a["twins"])
            out.append(f"- {arch}: the first budget's stability of single, expanded and bagging comes from twins ("
                       f"{len(a['twins'])} runs trained again, the same seeds, to {a['twins'][0]['steps']} steps: table 1's "
                       f"runs passed that step before decoders were kept); their MSE equals the runs' own evaluation "
                       f"there " + ("exactly." if worst == 0 else f"to a relative {worst:.1e}."))
    return out


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import format_table

    lines = [f"# Table 1 across budgets (J = {result['members']}, {result['hook']})", "",
             "The same seeds at the first study's budget, a third of the new one and the new one. Single, expanded "
             "and bagging: evaluations of table 1's runs as they trained; boosting: runs of their own at the first "
             "budget (its stage length is the budget). Verdicts: the paper's direction with disjoint 95% intervals "
             "(agrees / disagrees), else no difference.", "",
             f"Regenerate: `python -m experiments.across_budgets --scale {result['scale']}`", "",
             "## The paper's comparisons as the budget grows", "", *finding_lines(result), *twin_lines(result), ""]
    for arch, a in result["archs"].items():
        rows = [{"tokens": p["tokens"], "steps": p["steps"], "method": m,
                 **{k: v["mean"] for k, v in r.items() if k in METRICS},
                 "stability": common.fmt_ci(r["stability"], r["stability_ci_low"], r["stability_ci_high"])
                 if "stability" in r else "n/a", "chance": r.get("stability_chance", "n/a")}
                for p in a["points"] for m, r in p["methods"].items()]
        lines += [f"## {arch}", "", format_table(rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
