"""Table 1: single vs expanded vs bagging vs boosting at equal feature count (J = members).

For each architecture (TopK, the main one, with `seeds` independent ensembles; ReLU+L1 and JumpReLU
with `other_seeds`): every metric over the cache's test tokens (mean and 95% Student-t CI over the
independent runs), stability across the independent runs, spliced LM loss on held-out contexts,
training wall time and training FLOPs (FLOP model: experiments/common.py). Writes
results/intrinsic.{json,md} and intrinsic.png.

A session's machine starts with an empty work directory, so the table is assembled from what earlier
sessions committed: a row whose every run has its record in <results>/runs/ and whose stability is in
<results>/stability/ is read back, not retrained. A row is trained within one session (its stability
needs every run's decoder at once), and it leaves its stability at each smaller budget behind too.

    python -m experiments.intrinsic --scale full
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from experiments import common
from experiments.budgets import budget_steps, decoder_path, evals_dir, read_record, train_with_budgets
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
    name, run = row_run(scale, acts.d_in, arch, method, seed)
    if spliced is not None and (scale.budgets_of(arch) or method == "boosting"):
        budgets = () if method == "boosting" else scale.budgets_of(arch)  # boosting: its last step only
        train_with_budgets(scale, name, run, acts, budgets, budget_evaluator(scale, acts, spliced, name), progress,
                           decoders=True)
    return common.ensure_run(scale, name, run, acts, progress)


def row_run(scale: common.Scale, d_in: int, arch: str, method: str, seed: int) -> tuple[str, Any]:
    """(name, run) of the run that table 1's row trains for this seed (the single row: bagging's)."""
    source = "bagging" if method == "single" else method
    return row_run_name(scale, arch, method, seed), common.run_config(scale, d_in, arch, source, scale.members, seed)


def row_run_name(scale: common.Scale, arch: str, method: str, seed: int) -> str:
    return common.run_name(arch, "bagging" if method == "single" else method, scale.members, seed, scale.k)


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
        return out

    return evaluate


def evaluate_run(scale, acts, spliced: common.Spliced, ens, info: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics; a run evaluated at its last step as it trained (budget_evaluator, the same
    computation on the same contexts) reuses that record instead of evaluating again."""
    def compute():
        trained = Path(info.get("member_of", info["run_dir"])).name  # the run that was evaluated as it trained
        steps = info["train_steps"] // (ens.n_members if ens.sequential else 1)  # a budget record counts one stage's
        rec = read_record(scale, trained, steps)
        if rec is not None:
            return rec["single"] if "member_of" in info else {k: v for k, v in rec.items() if k not in BUDGET_KEYS}
        return {**common.intrinsic_metrics(ens, acts, scale), **spliced.fast(ens)}

    path = common.run_path(info) / f"eval-{NAME}-{spliced.contexts.shape[0]}ctx.json"
    out = {**common.cached_json(path, compute), **info}
    common.cached_json(run_record_path(scale, info["run_dir"]), lambda: out)  # committable as soon as the run is evaluated
    return out


def run_dir_of(scale: common.Scale, arch: str, method: str, seed: int) -> str:
    """The run_dir (relative to WORK) that table_run's info gives for this row and seed."""
    rd = f"{scale.name}/runs/{row_run_name(scale, arch, method, seed)}"
    return f"{rd}/member-0" if method == "single" else rd


def run_record_path(scale: common.Scale, run_dir: str) -> Path:
    """The committed record of one run's table-1 evaluation (its metrics and training info)."""
    return common.results_dir(scale) / "runs" / f"{Path(run_dir).as_posix().replace('/', '_')}.json"


def vectors_prefix(scale: common.Scale, arch: str, method: str, tokens: int | None = None) -> Path:
    """Where a row's per-run max-cosine vectors (<prefix>-s<r>.npy) go; tokens: at a smaller budget."""
    d = common.results_dir(scale) / "stability"
    return d / f"{arch}-{method}" if tokens is None else d / "budgets" / f"{arch}-{method}-T{tokens}"


def committed_row(scale: common.Scale, arch: str, method: str, seeds: int, d_in: int
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """(per-seed records, stability and Hungarian columns) of a row that earlier sessions finished,
    read from the committed results; None when any part is missing (the row is then trained)."""
    if not row_committed(scale, arch, method, seeds):
        return None
    paths = [run_record_path(scale, run_dir_of(scale, arch, method, s)) for s in range(seeds)]
    per_seed = [{"seed": s, **json.loads(p.read_text())} for s, p in enumerate(paths)]
    if seeds < 2:
        return per_seed, {}
    prefix, members = vectors_prefix(scale, arch, method), members_of(scale, method)
    if prefix.with_suffix(".json").is_file():
        stab = json.loads(prefix.with_suffix(".json").read_text())
        if members > 1 and "stability_per_member" not in stab and vectors_committed(prefix, seeds):  # kept before the split
            stab["stability_per_member"] = metrics.stability_of_best(read_vectors(prefix, seeds),
                                                                     members=members)["per_member"]
        return per_seed, stab
    stab = read_stability(prefix, seeds, d_in, members)
    counts = [int(r["n_features"]) for r in per_seed]
    skipped = (f"> {scale.hungarian_max_features} features" if max(counts) > scale.hungarian_max_features
               else "the runs' decoders were not kept (trained in an earlier session)")
    return per_seed, {**stab, "hungarian_stability": float("nan"), "hungarian_skipped": skipped}


def row_committed(scale: common.Scale, arch: str, method: str, seeds: int) -> bool:
    """committed_row can read this row back: every run's record and the row's stability (its columns,
    or every run's max-cosine vector) are committed. A check of files: nothing is computed."""
    if not all(run_record_path(scale, run_dir_of(scale, arch, method, s)).is_file() for s in range(seeds)):
        return False
    prefix = vectors_prefix(scale, arch, method)
    return seeds < 2 or prefix.with_suffix(".json").is_file() or vectors_committed(prefix, seeds)


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    spliced = common.Spliced(scale, scale.spliced_contexts)
    rows, runs = [], {}
    for arch, seeds in arch_seeds(scale):
        for method in common.METHODS:
            done = committed_row(scale, arch, method, seeds, acts.d_in)  # --force rewrites the table, not the runs
            if done is not None:
                per_seed, stab = done
            else:
                per_seed, decoders = [], []
                for seed in range(seeds):
                    ens, info = table_run(scale, acts, arch, method, seed, progress, spliced)
                    per_seed.append({"seed": seed, **evaluate_run(scale, acts, spliced, ens, info)})
                    decoders.append(np.asarray(ensemble.decoder(ens)))
                stab = {}
                if len(decoders) >= 2:
                    prefix = vectors_prefix(scale, arch, method)
                    stab = {**stability_of(decoders, prefix, members_of(scale, method)), **hungarian_of(decoders, scale)}
                    common.cached_json(prefix.with_suffix(".json"), lambda: stab)
                    for m in ("single", "bagging") if method == "bagging" else (method,):  # single: bagging's rows
                        keep_budget_stability(scale, arch, m, seeds, acts.d_in)
            row: dict[str, Any] = {"arch": arch, "method": method, "J": 1 if method == "single" else scale.members,
                                   "n_features": per_seed[0]["n_features"], "runs": len(per_seed), **stab}
            for m in METRICS:
                row[m] = metrics.mean_ci([r[m] for r in per_seed])
            rows.append(row)
            runs[f"{arch}/{method}"] = per_seed
            complete = len(rows) == len(arch_seeds(scale)) * len(common.METHODS)
            result = {"scale": scale.name, "setting": setting(scale, acts), "rows": rows, "runs": runs,
                      "complete": complete}  # each finished row is written at once (a rerun reads it back)
            common.write_result(scale, NAME, result, markdown(result))
    plot(result, common.results_dir(scale) / f"{NAME}.png")
    return result


def stability_of(decoders: list, vectors: Path | None = None, members: int = 1) -> dict[str, Any]:
    """Table 1's stability columns: saeens.metrics.stability's mean, Student-t bounds, per-run scores,
    its chance level (random unit vectors of the same counts) with the ratio over it, and for an
    ensemble (members > 1) each member's (boosting: stage's) stability. vectors: where each run's
    per-feature max cosine to the other runs goes (<vectors>-s<r>.npy, float16), small enough to
    commit and enough to redo any summary of stability without the runs."""
    best = metrics.max_cosines_to_others(decoders)
    if vectors is not None:
        from saeens.io.files import atomic_save_npy

        vectors.parent.mkdir(parents=True, exist_ok=True)
        for r, best_F in enumerate(best):
            atomic_save_npy(vector_path(vectors, r), best_F.astype(np.float16))
    return _stability_columns(metrics.stability_of_best(best, members=members), [b.size for b in best],
                              int(decoders[0].shape[1]))


def read_stability(vectors: Path, runs: int, d_in: int, members: int = 1) -> dict[str, Any] | None:
    """stability_of's columns from its committed vectors; None when a run's vector is missing."""
    if not vectors_committed(vectors, runs):
        return None
    best = read_vectors(vectors, runs)
    return _stability_columns(metrics.stability_of_best(best, members=members), [b.size for b in best], d_in)


def read_vectors(vectors: Path, runs: int) -> list[np.ndarray]:
    """Each run's committed per-feature max-cosine vector under the prefix `vectors`."""
    return [np.load(vector_path(vectors, r)).astype(np.float32) for r in range(runs)]


def vectors_committed(vectors: Path, runs: int) -> bool:
    """Every run's max-cosine vector under this prefix is committed (a check: no chance level computed)."""
    return all(vector_path(vectors, r).is_file() for r in range(runs))


def vector_path(vectors: Path, run: int) -> Path:
    """Run `run`'s per-feature max-cosine vector under the prefix `vectors`."""
    return vectors.with_name(f"{vectors.name}-s{run}.npy")


def members_of(scale: common.Scale, method: str) -> int:
    """The member count that a row's features split into (1: a single or expanded SAE)."""
    return scale.members if method in ("bagging", "boosting") else 1


def _stability_columns(s: dict[str, Any], counts: list[int], d_in: int) -> dict[str, Any]:
    chance = metrics.stability_chance(counts, d_in)["stability"]
    out = {"stability": s["mean"], "stability_ci_low": s["ci_low"], "stability_ci_high": s["ci_high"],
           "stability_scores": s["scores"], "stability_chance": chance,
           "stability_over_chance": metrics.over_chance(s["mean"], chance)}
    if "per_member" in s:  # each block's chance level is the run's (its features search the same other runs)
        out["stability_per_member"] = s["per_member"]
    return out


def budget_stability(scale: common.Scale, arch: str, method: str, recs: list[dict[str, Any]], d_in: int
                     ) -> dict[str, Any]:
    """Stability at one smaller budget over the runs of `recs` (each with the path of its kept
    `decoder` and, for the single SAE, the `member_rows` of bagging's decoder that are its own): from
    the decoders when every one is at hand (its vectors committed), else from the committed vectors,
    else nothing (the decoders went with an earlier session's machine). At table 1's own budget the
    row's committed vectors are read (the same numbers, kept once)."""
    members = members_of(scale, method)
    table_tokens = common.run_config(scale, d_in, arch, "bagging", scale.members, 0).train.n_steps * scale.batch_size
    if recs[0]["tokens"] == table_tokens and vectors_committed(vectors_prefix(scale, arch, method), len(recs)):
        return read_stability(vectors_prefix(scale, arch, method), len(recs), d_in, members)  # table 1's own
    prefix = vectors_prefix(scale, arch, method, recs[0]["tokens"])
    if all(Path(r["decoder"]).is_file() for r in recs):
        return stability_of([np.load(r["decoder"])[: r.get("member_rows")] for r in recs], prefix, members)
    return read_stability(prefix, len(recs), d_in, members) or {}


def keep_budget_stability(scale: common.Scale, arch: str, method: str, seeds: int, d_in: int) -> None:
    """Commit a just-trained row's stability at each smaller budget while its runs' decoders there
    are at hand (table 1 across budgets reads it in a later session). Boosting has no smaller budget:
    its runs there are twins of their own (experiments/across_budgets.py)."""
    if method == "boosting":
        return
    source = "bagging" if method == "single" else method
    run = common.run_config(scale, d_in, arch, source, scale.members, 0)
    for steps in budget_steps(run, scale.budgets_of(arch))[:-1]:
        recs = [{"tokens": steps * scale.batch_size, "member_rows": scale.width if method == "single" else None,
                 "decoder": decoder_path(evals_dir(scale, common.run_name(arch, source, scale.members, s, scale.k)),
                                         steps)} for s in range(seeds)]
        if all(r["decoder"].is_file() for r in recs):
            budget_stability(scale, arch, method, recs, d_in)


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
    from saeens.tables import ev_drivers_line, format_table, per_member_text, stability_members_line

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
    if not result.get("complete", True):
        lines += ["**Partial**: the rows finished so far (each is written as it lands); a rerun trains the rest.", ""]
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
    members = []
    for r in result["rows"]:
        means = per_member_means(result["runs"][f"{r['arch']}/{r['method']}"])
        parts = ([per_member_text(means)] if means else []) + [stability_members_line(r)]
        if any(parts):
            members.append(f"- {r['arch']} {r['method']}: " + "; ".join(p for p in parts if p))
    if members:
        lines += ["", "## Each member's (boosting: each stage's) l0, dead fraction and stability", "",
                  "Mean over seeds; l0 and dead fraction on the test tokens (saeens.metrics.finalize's per-member "
                  "split), stability over each member's features alone (saeens.metrics.stability_per_member):", ""]
        lines += members
    return "\n".join(lines)


def per_member_means(per_seed: list[dict[str, Any]]) -> dict[str, list[float]] | None:
    """Each member's (boosting: each stage's) l0 and dead fraction, mean over the seeds; None unless
    every seed's record holds them (an ensemble evaluated since saeens.metrics.finalize splits them)."""
    keys = ("l0_per_member", "dead_fraction_per_member")
    if not per_seed or not all(k in r for r in per_seed for k in keys):
        return None
    return {k: np.mean([r[k] for r in per_seed], axis=0).tolist() for k in keys}


def plot(result: dict[str, Any], out) -> None:
    from saeens.plots import grouped_bars

    grouped_bars(result["rows"], ["explained_variance", "l0", "delta_lm_loss", "diversity_fraction", "stability",
                                  "train_flops"], out, group="arch", bar="method",
                 title=f"{result['setting']['hook']}: J = {result['setting']['scale']['members']}",
                 marks={"stability": "stability_chance"})


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
