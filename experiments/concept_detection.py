"""Table 4: concept detection (SAEBench sparse probing) for single / expanded / bagging / boosting.

The four TopK ensembles are table 1's seed-0 runs (J = members). For each labelled dataset
(bbc-topic, tweet-sentiment, shakespeare-genre, text-source) the documents are subsampled, tokenised
and run through the model ONCE; every ensemble encodes the same hook activations, and
`saeens.evals.probing.probe_pooled` (the model-free half of `run_probing`, so the same protocol:
balanced one-vs-rest tasks, top-k latents by |mean_pos - mean_neg|, L2 logistic regression C = 1)
gives the test accuracy for k in (1, 2, 5) and the raw-activation baseline; for boosting also each
stage's latents alone (the whole ensemble's ranking may pick one stage's latents only). Each
finished dataset is written at once, and each pooled batch is kept in the work directory
(experiments/downstream.py), so a session that ends mid-pass loses neither. Writes
results/concept_detection.{json,md,png}.

    python -m experiments.concept_detection --scale full
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from experiments import common
from experiments.downstream import (budget_title, method_ensembles, pool_documents, regenerate, result_name,
                                    train_tokens)
from experiments.uncertainty import accuracy_ci, paired_accuracy_ci
from saeens.evals.probing import ProbingConfig, correct_from_bits, probe_pooled

NAME = "concept_detection"
DATASETS = ("bbc-topic", "tweet-sentiment", "shakespeare-genre", "text-source")
KS = (1, 2, 5)


def main(scale: common.Scale, force: bool = False, progress: bool = True,
         first_budget: bool = False) -> dict[str, Any] | None:
    """Table 4 (first_budget: the same at the first study's budget, experiments/downstream_budgets.py)."""
    from saeens.data.labelled import probing_dataset

    stem = result_name(NAME, first_budget)
    if common.result_done(scale, stem, force):
        return None
    acts = common.get_cache(scale, progress)
    ens = method_ensembles(scale, acts, progress, first_budget)
    cfg = ProbingConfig(ks=KS, context_length=scale.probe_context, batch_size=scale.batch_forward,
                        max_train_per_class=scale.probe_train_per_class, max_test_per_class=scale.probe_test_per_class)
    earlier = {} if force else common.read_result(scale, stem) or {}  # a partial result: the datasets finished
    same = earlier.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg)))  # as the JSON holds it
    datasets = earlier.get("datasets", {}) if same else {}
    for name in DATASETS:
        if name in datasets:
            continue
        ds = probing_dataset(name).subsample(cfg.max_train_per_class, cfg.max_test_per_class, cfg.seed)
        pooled = {}
        for split, docs in (("train", ds.train), ("test", ds.test)):
            pooled[split] = pool_documents(scale, [d.text for d in docs], tuple(ens.values()), cfg.context_length,
                                           progress, keep=f"{stem}-{name}-{split}")

        def probe(i: int, cols: slice):  # ensemble i's latents `cols`
            return probe_pooled(ds.classes, [d.label for d in ds.train], pooled["train"][0],
                                pooled["train"][1][i][:, cols], [d.label for d in ds.test], pooled["test"][0],
                                pooled["test"][1][i][:, cols], cfg)

        by_method = {}
        for i, (method, e) in enumerate(ens.items()):
            by_method[method] = accuracies(probe(i, slice(None)))
            if e.sequential:  # boosting: each stage's latents alone (the ensemble's ranking may pick one stage's)
                m = e.params["W_dec"].shape[1]
                by_method[method]["stages"] = [accuracies(probe(i, slice(j * m, (j + 1) * m)))
                                               for j in range(e.n_members)]
        datasets[name] = {"counts": ds.counts(), "methods": by_method}
        result = {"scale": scale.name, "hook": common.hook(), "members": scale.members, "width": scale.width,
                  "k": scale.k, "train_tokens": train_tokens(scale, acts, first_budget), "first_budget": first_budget,
                  "config": dataclasses.asdict(cfg), "datasets": datasets,
                  "complete": len(datasets) == len(DATASETS)}  # each finished dataset is written at once
        common.write_result(scale, stem, result, markdown(result))
    plot(result, common.results_dir(scale) / f"{stem}.png")
    return result


def accuracies(tasks) -> dict[str, Any]:
    """One method's (or one boosting stage's) entry: mean accuracies over its tasks, the bootstrap
    over each task's test documents (a difference between methods inside it is none), the tasks."""
    return {"llm_test_accuracy": float(np.mean([t.llm_test_accuracy for t in tasks])),
            **{f"sae_top_{k}_test_accuracy": float(np.mean([dict(t.sae_test_accuracy)[k] for t in tasks])) for k in KS},
            **{f"sae_top_{k}_test_accuracy_ci": accuracy_ci([(dict(t.sae_test_accuracy)[k], t.n_test) for t in tasks])
               for k in KS},
            "tasks": [t.to_dict() for t in tasks]}


def methods_of(result: dict[str, Any]) -> list[str]:
    return list(next(iter(result["datasets"].values()))["methods"])


def stages_of(result: dict[str, Any], method: str) -> int:
    """How many boosting stages were probed alone for `method` in every dataset (0: none recorded)."""
    return min(len(d["methods"][method].get("stages", ())) for d in result["datasets"].values())


def _entry(d: dict[str, Any], method: str, stage: int | None) -> dict[str, Any]:
    return d["methods"][method] if stage is None else d["methods"][method]["stages"][stage]


def mean_over_datasets(result: dict[str, Any], method: str, key: str, stage: int | None = None) -> float:
    """A method's accuracy `key` (e.g. sae_top_1_test_accuracy) averaged over the datasets; with
    `stage`, that boosting stage's latents alone."""
    return float(np.mean([_entry(d, method, stage)[key] for d in result["datasets"].values()]))


def mean_over_datasets_ci(result: dict[str, Any], method: str, k: int, stage: int | None = None) -> dict[str, Any]:
    """mean_over_datasets of the top-k accuracy with its bootstrap interval over every task's test
    documents (each dataset weighs the same), to tell a lead from the test sets' noise."""
    tasks = [(name, t["sae_test_accuracy"][str(k)], t["n_test"]) for name, d in result["datasets"].items()
             for t in _entry(d, method, stage)["tasks"]]
    return accuracy_ci([(a, n) for _, a, n in tasks], groups=[name for name, _, _ in tasks])


def paired_ci(result: dict[str, Any], a: str, b: str, k: int,
              stages: tuple[int | None, int | None] = (None, None)) -> dict[str, Any] | None:
    """Method a's mean top-k accuracy minus b's over the same test documents, with the paired
    bootstrap (uncertainty.paired_accuracy_ci; each dataset weighs the same); `stages` picks a
    boosting stage alone on either side. None when a task has no per-document record (older results)."""
    if not paired_recorded(result, k):
        return None
    pairs = [(name, ta, tb) for name, d in result["datasets"].items()
             for ta, tb in zip(_entry(d, a, stages[0])["tasks"], _entry(d, b, stages[1])["tasks"], strict=True)]
    bits = [(correct_from_bits(ta["sae_test_correct"][str(k)]), correct_from_bits(tb["sae_test_correct"][str(k)]))
            for _, ta, tb in pairs]
    return paired_accuracy_ci([of_a for of_a, _ in bits], [of_b for _, of_b in bits],
                              groups=[name for name, _, _ in pairs])


def paired_recorded(result: dict[str, Any], k: int) -> bool:
    """Whether every task (of every method and stage) records each test document's top-k correctness,
    which `paired_ci` needs (results scored before it was recorded do not)."""
    entries = [e for d in result["datasets"].values() for r in d["methods"].values() for e in (r, *r.get("stages", ()))]
    return all(str(k) in t.get("sae_test_correct", {}) for e in entries for t in e["tasks"])


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import format_table

    rows = []
    for name, d in result["datasets"].items():
        for method, r in d["methods"].items():
            rows.append({"dataset": name, "method": method, **{f"top_{k}": r[f"sae_top_{k}_test_accuracy"] for k in KS},
                         "llm_all_dims": r["llm_test_accuracy"]})
    for method in methods_of(result):
        rows.append({"dataset": "MEAN", "method": method,
                     **{f"top_{k}": mean_over_datasets(result, method, f"sae_top_{k}_test_accuracy") for k in KS},
                     "llm_all_dims": mean_over_datasets(result, method, "llm_test_accuracy")})
        for j in range(stages_of(result, method)):
            rows.append({"dataset": "MEAN", "method": f"{method} stage {j + 1} alone",
                         **{f"top_{k}": mean_over_datasets(result, method, f"sae_top_{k}_test_accuracy", j)
                            for k in KS},
                         "llm_all_dims": mean_over_datasets(result, method, "llm_test_accuracy")})
    c = result["config"]
    return "\n".join([
        f"# Table 4: concept detection (sparse probing), TopK k = {result['k']}, J = {result['members']}"
        f"{budget_title(result)}", "",
        f"Test accuracy of an L2 logistic regression on the top-k latents (mean over one-vs-rest tasks; balanced "
        f"sets; at most {c['max_train_per_class']} train / {c['max_test_per_class']} test documents per class, "
        f"first {c['context_length']} tokens). llm_all_dims: the same probe on all raw activation dims. "
        + ("'boosting stage j alone': the latents are chosen among stage j's only. "
           if any(stages_of(result, m) for m in methods_of(result)) else "") + "Plot: concept_detection.png.", "",
        f"Regenerate: {regenerate(result, NAME)}", "",
        *(["**Partial**: the datasets finished so far; a rerun finishes the rest.", ""]
          if not result.get("complete", True) else []), format_table(rows)])


def plot(result: dict[str, Any], out) -> None:
    from saeens.plots import curves_with_bands

    series: dict[str, dict] = {}
    hl: dict[str, dict] = {"raw activations": {}}
    for name, d in result["datasets"].items():
        for method, r in d["methods"].items():
            series.setdefault(method, {})[name] = {"x": list(KS), "mean": [r[f"sae_top_{k}_test_accuracy"] for k in KS]}
            hl["raw activations"][name] = r["llm_test_accuracy"]
    curves_with_bands(series, list(result["datasets"]), out, xlabel="k latents", hlines=hl,
                      title=f"{result['hook']}: sparse probing accuracy")


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
