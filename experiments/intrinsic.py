"""Table 1: single vs expanded vs bagging vs boosting at equal feature count (J = members).

For each architecture (TopK, the main one, with `seeds` independent ensembles; ReLU+L1 and JumpReLU
with `other_seeds`): every metric over the cache's test tokens (mean and 95% Student-t CI over the
independent runs), stability across the independent runs, spliced LM loss on held-out contexts,
training wall time and training FLOPs (FLOP model: experiments/common.py). Writes
results/intrinsic.{json,md} and intrinsic.png.

    python -m experiments.intrinsic --scale full
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common
from experiments.budgets import evals_dir, keep_decoder, record_path, train_with_budgets
from saeens import ensemble, metrics

NAME = "intrinsic"
METRICS = ("mse", "explained_variance", "explained_variance_pooled", "explained_variance_per_token", "fvu", "l0", "relative_reconstruction_bias",
           "dead_fraction", "dense_fraction", "diversity", "diversity_fraction", "connectivity", "delta_lm_loss",
           "loss_recovered", "ce_loss_spliced", "train_seconds", "train_flops")


def arch_seeds(scale: common.Scale) -> list[tuple[str, int]]:
    return [("topk", scale.seeds)] + [(arch, scale.other_seeds) for arch, _ in scale.other_archs]


def table_run(scale: common.Scale, acts, arch: str, method: str, seed: int, progress: bool,
              spliced: common.Spliced | None = None):
    """One of table 1's runs (trained on first use; the J sweep, probing and SCR reuse them).

    The single SAE of seed s is member 0 of the bagging run of seed s: bagging's members never
    interact, and member j is exactly the SAE a single run with its key trains (tests/test_train.py,
    the bagging test), so the single row costs no training of its own. With `spliced`, single,
    expanded and bagging runs are also evaluated at the scale's budgets as they train
    (experiments/budgets.py; boosting's stage length is its budget, so it is evaluated at its end only)."""
    if method == "single":
        return member_zero(*table_run(scale, acts, arch, "bagging", seed, progress, spliced))
    J = scale.members
    run = common.run_config(scale, acts.d_in, arch, method, J, seed)
    name = common.run_name(arch, method, J, seed, scale.k)
    if spliced is not None and (scale.budgets_of(arch) or method == "boosting"):
        budgets = () if method == "boosting" else scale.budgets_of(arch)  # boosting: its last step only
        train_with_budgets(scale, name, run, acts, budgets, budget_evaluator(scale, acts, spliced, name), progress)
    return common.ensure_run(scale, name, run, acts, progress)


def member_zero(bag, info: dict[str, Any]):
    """A bagging run's member 0 as the single SAE it is (run_dir <bagging run>/member-0), with its
    share of the run's training time and FLOPs."""
    J = bag.n_members
    return ensemble.single(bag.cfg, ensemble.member(bag, 0)), {
        **info, "run_dir": f"{info['run_dir']}/member-0", "member_of": info["run_dir"],
        "train_seconds": info["train_seconds"] / J, "train_flops": info["train_flops"] / J}


BUDGET_KEYS = ("steps", "tokens", "single")  # what a budget record holds besides the ensemble's metrics


def budget_evaluator(scale: common.Scale, acts, spliced: common.Spliced, name: str):
    """evaluate(ensemble, steps) for train_with_budgets: the metrics of the ensemble at a budget and,
    for bagging, of its member 0 (the single SAE); its decoder is kept for stability at that budget."""
    def evaluate(ens, steps: int) -> dict[str, Any]:
        out = {**common.intrinsic_metrics(ens, acts, scale), **spliced.fast(ens)}
        if ens.n_members > 1 and not ens.sequential:
            one = ensemble.single(ens.cfg, ensemble.member(ens, 0))
            out["single"] = {**common.intrinsic_metrics(one, acts, scale), **spliced.fast(one)}
        keep_decoder(evals_dir(scale, name), ens, steps)
        return out

    return evaluate


def evaluate_run(scale, acts, spliced: common.Spliced, ens, info: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics; a run evaluated at its last step as it trained (budget_evaluator, the same
    computation on the same contexts) reuses that record instead of evaluating again."""
    def compute():
        trained = Path(info.get("member_of", info["run_dir"])).name  # the run that was evaluated as it trained
        steps = info["train_steps"] // (ens.n_members if ens.sequential else 1)  # a budget record counts one stage's
        final = record_path(scale, trained, steps)
        if final.is_file():
            rec = json.loads(final.read_text())
            return rec["single"] if "member_of" in info else {k: v for k, v in rec.items() if k not in BUDGET_KEYS}
        return {**common.intrinsic_metrics(ens, acts, scale), **spliced.fast(ens)}

    path = common.run_path(info) / f"eval-{NAME}-{spliced.contexts.shape[0]}ctx.json"
    out = {**common.cached_json(path, compute), **info}
    small = common.results_dir(scale) / "runs" / f"{Path(info['run_dir']).as_posix().replace('/', '_')}.json"
    common.cached_json(small, lambda: out)  # committable as soon as the run is evaluated
    return out


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    spliced = common.Spliced(scale, scale.spliced_contexts)
    rows, runs = [], {}
    for arch, seeds in arch_seeds(scale):
        for method in common.METHODS:
            per_seed, decoders = [], []
            for seed in range(seeds):
                ens, info = table_run(scale, acts, arch, method, seed, progress, spliced)
                per_seed.append({"seed": seed, **evaluate_run(scale, acts, spliced, ens, info)})
                decoders.append(np.asarray(ensemble.decoder(ens)))
            row: dict[str, Any] = {"arch": arch, "method": method, "J": 1 if method == "single" else scale.members,
                                   "n_features": per_seed[0]["n_features"], "runs": len(per_seed)}
            for m in METRICS:
                row[m] = metrics.mean_ci([r[m] for r in per_seed])
            if len(decoders) >= 2:
                row.update(stability_of(decoders, common.results_dir(scale) / "stability" / f"{arch}-{method}"))
                row.update(hungarian_of(decoders, scale))
            rows.append(row)
            runs[f"{arch}/{method}"] = per_seed
    result = {"scale": scale.name, "setting": setting(scale, acts), "rows": rows, "runs": runs}
    common.write_result(scale, NAME, result, markdown(result))
    plot(result, common.results_dir(scale) / f"{NAME}.png")
    return result


def stability_of(decoders: list, vectors: Path | None = None) -> dict[str, Any]:
    """Table 1's stability columns: saeens.metrics.stability's mean, Student-t bounds, per-run scores,
    and its chance level (random unit vectors of the same counts) with the ratio over it. vectors:
    where each run's per-feature max cosine to the other runs goes (<vectors>-s<r>.npy, float16),
    small enough to commit and enough to redo any summary of stability without the runs."""
    s = metrics.stability(decoders)
    if vectors is not None:
        from saeens.io.files import atomic_save_npy

        vectors.parent.mkdir(parents=True, exist_ok=True)
        for r, W_FD in enumerate(decoders):
            others_GD = np.concatenate([W for q, W in enumerate(decoders) if q != r])
            best_F = np.asarray(metrics.max_cosine(W_FD, others_GD), np.float16)
            atomic_save_npy(vectors.with_name(f"{vectors.name}-s{r}.npy"), best_F)
    chance = metrics.stability_chance([int(d.shape[0]) for d in decoders], int(decoders[0].shape[1]))["stability"]
    return {"stability": s["mean"], "stability_ci_low": s["ci_low"], "stability_ci_high": s["ci_high"],
            "stability_scores": s["scores"], "stability_chance": chance,
            "stability_over_chance": metrics.over_chance(s["mean"], chance)}


def hungarian_of(decoders: list, scale: common.Scale) -> dict[str, Any]:
    """Table 1's Hungarian columns, skipped (NaN) past the scale's feature limit (O(F^3) per pair)."""
    if max(int(d.shape[0]) for d in decoders) > scale.hungarian_max_features:
        return {"hungarian_stability": float("nan"), "hungarian_skipped": f"> {scale.hungarian_max_features} features"}
    h = metrics.hungarian_stability(decoders)
    return {"hungarian_stability": h["mean"], "hungarian_ci_low": h["ci_low"], "hungarian_ci_high": h["ci_high"]}


def setting(scale: common.Scale, acts) -> dict[str, Any]:
    return {"model": common.MODEL, "hook": common.hook(), "corpora": list(common.CORPORA),
            "train_rows": acts.n_rows("train"), "test_rows": acts.n_rows("test"),
            "scale": dataclasses.asdict(scale), "cache_seconds": common.cache_seconds(scale),
            "flop_model": "dense: 12*B*d*m per member-step; boosting + 4*d*m per row of each stage's residual pass"}


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import ev_drivers_line, format_table

    s = result["setting"]
    sc = s["scale"]
    lines = [f"# Table 1: intrinsic metrics at equal feature count (J = {sc['members']})", "",
             f"{s['model']} `{s['hook']}`, {s['train_rows']} train / {s['test_rows']} test tokens of "
             f"{', '.join(s['corpora'])} (split by document). Width {sc['width']} per member, TopK k = {sc['k']}, "
             f"{sc['train_tokens']} tokens per SAE / boosting stage, batch {sc['batch_size']}, lr {sc['lr']}. "
             f"Mean over independent runs (TopK: {sc['seeds']}, others: {sc['other_seeds']}); stability: mean "
             f"[95% CI]. Connectivity over the first {sc['connectivity_tokens']} test tokens; spliced loss over "
             f"{sc['spliced_contexts']} held-out contexts of {sc['context_length']} tokens. FLOPs: {s['flop_model']}.",
             "", f"Regenerate: `python -m experiments.intrinsic --scale {result['scale']}`", ""]
    table = []
    for r in result["rows"]:
        t = {"arch": r["arch"], "method": r["method"], "features": r["n_features"]}
        for m in ("explained_variance", "explained_variance_pooled", "explained_variance_per_token", "mse", "l0",
                  "relative_reconstruction_bias",
                  "dead_fraction", "diversity", "connectivity", "delta_lm_loss", "loss_recovered"):
            t[m] = r[m]["mean"]
        t["stability"] = common.fmt_ci(r["stability"], r["stability_ci_low"], r["stability_ci_high"]) \
            if "stability" in r else "n/a"
        t["chance"] = r.get("stability_chance", "n/a")
        t["x_chance"] = r.get("stability_over_chance", "n/a")
        t["train_s"] = r["train_seconds"]["mean"]
        t["train_TFLOP"] = r["train_flops"]["mean"] / 1e12
        table.append(t)
    lines.append(format_table(table))
    lines += ["", "## What drives the per-dimension explained variance", "",
              "explained_variance averages 1 - SSE_d / SST_d over the dimensions, so a dimension with a sliver of "
              "the variance weighs as much as any other; explained_variance_pooled is 1 - sum SSE / sum SST. Per row, "
              "seed 0's three dimensions that pull the average down most (saeens.metrics.ev_drivers):", ""]
    for r in result["rows"]:
        first = result["runs"][f"{r['arch']}/{r['method']}"][0]
        if first.get("ev_drivers"):
            lines.append(f"- {r['arch']} {r['method']}: {ev_drivers_line(first)}")
    return "\n".join(lines)


def plot(result: dict[str, Any], out) -> None:
    from saeens.plots import grouped_bars

    grouped_bars(result["rows"], ["explained_variance", "l0", "delta_lm_loss", "diversity_fraction", "stability",
                                  "train_flops"], out, group="arch", bar="method",
                 title=f"{result['setting']['hook']}: J = {result['setting']['scale']['members']}")


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
