"""Table 5: spurious-correlation removal (SAEBench SCR, saeens/evals/scr.py) on tweets-mention.

Target sentiment (negative / positive), spurious attribute @mention (the offline stand-in for Bias
in Bios; see saeens/evals/scr.py). The four TopK ensembles are table 1's seed-0 runs. The documents
of the biased/balanced/test sets are run through the model ONCE (each pooled batch is kept in the
work directory, so a pass that a session's end interrupts resumes); each ensemble encodes the same
activations and `saeens.evals.scr.scr_from_pooled` (the model-free half of `run_scr`: same probes,
same latent ranking, zero-ablation with the error term kept) scores N ablated latents for N in
scr_ns, with N random latents as a control. Writes results/spurious_removal.{json,md,png}.

    python -m experiments.spurious_removal --scale full
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from experiments import common
from experiments.downstream import (budget_title, method_ensembles, pool_documents, regenerate, result_name,
                                    train_tokens)
from saeens import ensemble
from saeens.evals.scr import PooledSCRData, SCRConfig, score_ci, scr_from_pooled, scr_sets

NAME = "spurious_removal"
DATASET = "tweets-mention"


def main(scale: common.Scale, force: bool = False, progress: bool = True,
         first_budget: bool = False) -> dict[str, Any] | None:
    """Table 5 (first_budget: the same at the first study's budget, experiments/downstream_budgets.py)."""
    from saeens.data.labelled import scr_dataset

    stem = result_name(NAME, first_budget)
    if common.result_done(scale, stem, force):
        return None
    acts = common.get_cache(scale, progress)
    ens = method_ensembles(scale, acts, progress, first_budget)
    cfg = SCRConfig(n_ablated=scale.scr_ns, context_length=scale.probe_context, batch_size=scale.batch_forward,
                    n_train_per_group=scale.scr_train_per_group, n_test_per_group=scale.scr_test_per_group)
    ds = scr_dataset(DATASET)
    sets = scr_sets(ds, cfg)
    docs = list({d.doc_id: d for s in sets.values() for d in s}.values())  # each document pooled once
    row = {d.doc_id: i for i, d in enumerate(docs)}
    pooled_acts, pooled_codes = pool_documents(scale, [d.text for d in docs], tuple(ens.values()), cfg.context_length,
                                               progress, keep=stem)  # an interrupted pass resumes

    def take(name: str, codes: np.ndarray):
        idx = np.asarray([row[d.doc_id] for d in sets[name]])
        y = np.asarray([d.label == ds.targets[0] for d in sets[name]])
        s = np.asarray([d.attr(ds.spurious) == ds.spurious_values[0] for d in sets[name]])
        return pooled_acts[idx], codes[idx], y, s

    methods = {}
    for i, (method, e) in enumerate(ens.items()):
        a_bi, _, y_bi, _ = take("biased_train", pooled_codes[i])
        a_ba, c_ba, y_ba, s_ba = take("balanced_train", pooled_codes[i])
        a_te, c_te, y_te, s_te = take("test", pooled_codes[i])
        data = PooledSCRData(a_bi, y_bi, a_ba, c_ba, y_ba, s_ba, a_te, c_te, y_te, s_te)
        W_dec = np.asarray(ensemble.decoder(e), np.float32)
        probes, abl, rnd, top = scr_from_pooled(data, W_dec, cfg)
        methods[method] = {
            # bootstrap over the test documents: a difference between methods inside it is none
            **{f"scr_ci_top_{a.n_ablated}": score_ci(probes, data, W_dec, top[: a.n_ablated]) for a in abl},
            "n_features": e.width,
            "biased_accuracy": probes.biased_accuracy, "oracle_accuracy": probes.oracle_accuracy,
            "spurious_accuracy": probes.spurious_accuracy,
            **{f"scr_metric_top_{a.n_ablated}": a.score for a in abl},
            "ablations": [dataclasses.asdict(a) for a in abl],
            "random_ablations": [dataclasses.asdict(a) for a in rnd],
            "top_latents": [int(t) for t in top],
        }
    counts = {name: {f"{t}/{s}": sum(ds.group(d) == (t, s) for d in docs_) for t in ds.targets
                     for s in ds.spurious_values} for name, docs_ in sets.items()}
    result = {"scale": scale.name, "hook": common.hook(), "dataset": DATASET, "members": scale.members,
              "width": scale.width, "k": scale.k, "train_tokens": train_tokens(scale, acts, first_budget),
              "first_budget": first_budget, "config": dataclasses.asdict(cfg), "group_counts": counts,
              "methods": methods}
    common.write_result(scale, stem, result, markdown(result))
    plot(result, common.results_dir(scale) / f"{stem}.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import format_table

    rows = []
    for method, r in result["methods"].items():
        row = {"method": method, "features": r["n_features"], "biased": r["biased_accuracy"],
               "oracle": r["oracle_accuracy"], "spurious_probe": r["spurious_accuracy"]}
        for n, a in zip(result["config"]["n_ablated"], r["ablations"]):  # N is capped at the feature count
            row[f"N={n}"] = a["score"]
        row[f"random_N={result['config']['n_ablated'][-1]}"] = \
            r["random_ablations"][-1]["score"] if r["random_ablations"] else float("nan")
        rows.append(row)
    c = result["config"]
    return "\n".join([
        f"# Table 5: spurious-correlation removal on {result['dataset']} (TopK k = {result['k']}, J = {result['members']}"
        f"{budget_title(result)})",
        "", "score(N) = (acc_ablated - acc_biased) / (acc_oracle - acc_biased) of the biased probe on the balanced "
        f"test set after zero-ablating the top N latents (error term kept); {c['n_train_per_group']} documents per "
        f"biased train group, {c['n_test_per_group']} per test group (N is capped at the number of features). "
        "random_N: N random latents (control). "
        "Plot: spurious_removal.png.", "",
        f"Regenerate: {regenerate(result, NAME)}", "", format_table(rows)])


def plot(result: dict[str, Any], out) -> None:
    from saeens.plots import curves_with_bands

    series = {}
    for method, r in result["methods"].items():
        series[method] = {
            "SCR score": {"x": [a["n_ablated"] for a in r["ablations"]], "mean": [a["score"] for a in r["ablations"]]},
            "SCR score, random latents": {"x": [a["n_ablated"] for a in r["random_ablations"]],
                                          "mean": [a["score"] for a in r["random_ablations"]]},
            "spurious probe accuracy": {"x": [a["n_ablated"] for a in r["ablations"]],
                                        "mean": [a["spurious_accuracy"] for a in r["ablations"]]},
        }
    curves_with_bands(series, ["SCR score", "SCR score, random latents", "spurious probe accuracy"], out,
                      xlabel="N ablated latents", xscale="log", title=f"{result['hook']}: SCR on {result['dataset']}")


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
