"""Table 4: concept detection (SAEBench sparse probing) for single / expanded / bagging / boosting.

The four TopK ensembles are table 1's seed-0 runs (J = members). For each labelled dataset
(bbc-topic, tweet-sentiment, shakespeare-genre, text-source) the documents are subsampled, tokenised
and run through the model ONCE; every ensemble encodes the same hook activations, and
`saeens.evals.probing.probe_pooled` (the model-free half of `run_probing`, so the same protocol:
balanced one-vs-rest tasks, top-k latents by |mean_pos - mean_neg|, L2 logistic regression C = 1)
gives the test accuracy for k in (1, 2, 5) and the raw-activation baseline. Each finished dataset
is written at once, and each pooled batch is kept in the work directory (`pool_documents`), so a
session that ends mid-pass loses neither. Writes results/concept_detection.{json,md,png}.

    python -m experiments.concept_detection --scale full
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import across_budgets, common
from experiments.intrinsic import member_zero, table_run
from experiments.uncertainty import accuracy_ci
from saeens import ensemble
from saeens.evals.probing import ProbingConfig, hook_acts, pool_weights, probe_pooled, tokenize_texts
from saeens.io.files import atomic_write

NAME = "concept_detection"
DATASETS = ("bbc-topic", "tweet-sentiment", "shakespeare-genre", "text-source")
KS = (1, 2, 5)
FIRST_BUDGET = "-first-budget"  # the name suffix of a downstream result at the first study's budget


@partial(jax.jit, static_argnums=(0, 5))
def _pool_many(graphdef, state, ensembles, tokens_BT, mask_BT, hook: str):
    """Mean-pooled hook activations [B, D] and each ensemble's mean-pooled codes [B, F_e] (BOS/pad skipped)."""
    acts_BTD = hook_acts(nnx.merge(graphdef, state), tokens_BT, hook)
    w_BT = pool_weights(mask_BT)
    B, T, D = acts_BTD.shape
    flat = acts_BTD.reshape(B * T, D)
    codes = tuple(jnp.einsum("bt,btf->bf", w_BT, ensemble.encode(e, flat).reshape(B, T, -1)) for e in ensembles)
    return jnp.einsum("bt,btd->bd", w_BT, acts_BTD), codes


def pool_documents(scale: common.Scale, texts: list[str], ensembles: tuple, context_length: int,
                   progress: bool = False, keep: str | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """(pooled activations [N, D], [pooled codes [N, F_e] per ensemble]) with one model pass per batch.

    With `keep` (a name), each pooled batch is kept under WORK/<scale>/pooled/<keep>/<fingerprint>/, so
    a pass that a session's end interrupted resumes at its first missing batch, and a rerun (--force)
    scores again without the model. The fingerprint covers what a batch depends on (texts, model, hook,
    context, batch size, every ensemble's parameters): a changed input never reads a stale batch."""
    from tqdm.auto import tqdm

    model, tokenizer = common.get_model()
    tok, mask = tokenize_texts(tokenizer, texts, context_length)
    graphdef, state = nnx.split(model)
    b = scale.batch_forward
    folder = None if keep is None else _kept_folder(scale, keep, texts, ensembles, context_length)
    acts, codes = [], [[] for _ in ensembles]
    for lo in tqdm(range(0, len(tok), b), disable=not progress, desc="pooling", unit="batch"):
        path = None if folder is None else folder / f"batch-{lo:07d}.npz"
        batch = _read_batch(path, len(ensembles))
        if batch is None:
            t, m = tok[lo : lo + b], mask[lo : lo + b]
            n = len(t)
            if n < b:  # pad to one compiled shape
                t = np.concatenate([t, np.zeros((b - n, t.shape[1]), np.int32)])
                m = np.concatenate([m, np.zeros((b - n, m.shape[1]), bool)])
            a, cs = jax.device_get(_pool_many(graphdef, state, ensembles, jnp.asarray(t), jnp.asarray(m),
                                              common.hook()))
            batch = np.asarray(a[:n], np.float32), [np.asarray(c[:n], np.float32) for c in cs]
            if path is not None:
                named = {"acts": batch[0], **{f"codes_{i}": c for i, c in enumerate(batch[1])}}
                atomic_write(path, lambda f: np.savez(f, **named), mode="wb")
        acts.append(batch[0])
        for i, c in enumerate(batch[1]):
            codes[i].append(c)
    return np.concatenate(acts), [np.concatenate(c) for c in codes]


def _kept_folder(scale: common.Scale, keep: str, texts: list[str], ensembles: tuple, context_length: int) -> Path:
    """This pass's folder of kept batches; other fingerprints' folders under the name (stale) are removed."""
    h = hashlib.sha256(json.dumps([common.MODEL, common.hook(), context_length, scale.batch_forward, texts]).encode())
    for e in ensembles:
        h.update(str(jax.tree.structure(e)).encode())
        for leaf in jax.tree.leaves(e):
            h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    root = common.WORK / scale.name / "pooled" / keep
    folder = root / h.hexdigest()[:16]
    for old in root.glob("*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _read_batch(path: Path | None, n_ensembles: int) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """A kept batch, or None when it is missing or torn (then it is pooled again)."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as z:
            return z["acts"], [z[f"codes_{i}"] for i in range(n_ensembles)]
    except (OSError, ValueError, KeyError):
        return None


def method_ensembles(scale: common.Scale, acts, progress: bool, first_budget: bool = False) -> dict[str, Any]:
    """Table 1's seed-0 TopK runs; with first_budget their twins (across_budgets.twin: the same seeds
    trained to the first study's budget only; the single SAE is member 0 of bagging's twin)."""
    if not first_budget:
        return {m: table_run(scale, acts, "topk", m, 0, progress)[0] for m in common.METHODS}
    out = {}
    for m in common.METHODS:
        ens, info = common.ensure_run(scale, *across_budgets.twin(scale, acts.d_in, "topk", m, 0), acts, progress)
        out[m] = member_zero(ens, info)[0] if m == "single" else ens
    return out


def result_name(name: str, first_budget: bool) -> str:
    """A downstream result's name: `name`, or at the first study's budget `name`-first-budget."""
    return f"{name}{FIRST_BUDGET if first_budget else ''}"


def budget_title(result: dict[str, Any]) -> str:
    """The budget a downstream table's ensembles were trained to (older results did not record it)."""
    if "train_tokens" not in result:
        return ""
    twins = " (the first study's budget: table 1's seed-0 runs' twins)" if result.get("first_budget") else ""
    return f", {result['train_tokens']:,} tokens per SAE{twins}"


def regenerate(result: dict[str, Any], script: str) -> str:
    script = "downstream_budgets" if result.get("first_budget") else script
    return f"`python -m experiments.{script} --scale {result['scale']}`"


def train_tokens(scale: common.Scale, acts, first_budget: bool) -> int:
    """Tokens per SAE / boosting stage of the ensembles `method_ensembles` returns."""
    return across_budgets.twin(scale, acts.d_in, "topk", "bagging", 0)[1].train.n_tokens if first_budget \
        else scale.train_tokens


def main(scale: common.Scale, force: bool = False, progress: bool = True,
         first_budget: bool = False) -> dict[str, Any] | None:
    """Table 4 (first_budget: the same at the first study's budget, experiments/downstream_budgets.py)."""
    from saeens.data.labelled import probing_dataset

    name_ = result_name(NAME, first_budget)
    if common.result_done(scale, name_, force):
        return None
    acts = common.get_cache(scale, progress)
    ens = method_ensembles(scale, acts, progress, first_budget)
    cfg = ProbingConfig(ks=KS, context_length=scale.probe_context, batch_size=scale.batch_forward,
                        max_train_per_class=scale.probe_train_per_class, max_test_per_class=scale.probe_test_per_class)
    earlier = {} if force else common.read_result(scale, name_) or {}  # a partial result: the datasets finished
    same = earlier.get("config") == json.loads(json.dumps(dataclasses.asdict(cfg)))  # as the JSON holds it
    datasets = earlier.get("datasets", {}) if same else {}
    for name in DATASETS:
        if name in datasets:
            continue
        ds = probing_dataset(name).subsample(cfg.max_train_per_class, cfg.max_test_per_class, cfg.seed)
        pooled = {}
        for split, docs in (("train", ds.train), ("test", ds.test)):
            pooled[split] = pool_documents(scale, [d.text for d in docs], tuple(ens.values()), cfg.context_length,
                                           progress, keep=f"{name_}-{name}-{split}")
        by_method = {}
        for i, method in enumerate(ens):
            tasks = probe_pooled(ds.classes, [d.label for d in ds.train], pooled["train"][0], pooled["train"][1][i],
                                 [d.label for d in ds.test], pooled["test"][0], pooled["test"][1][i], cfg)
            by_method[method] = {
                "llm_test_accuracy": float(np.mean([t.llm_test_accuracy for t in tasks])),
                **{f"sae_top_{k}_test_accuracy": float(np.mean([dict(t.sae_test_accuracy)[k] for t in tasks]))
                   for k in KS},
                # bootstrap over each task's test documents: a difference between methods inside it is none
                **{f"sae_top_{k}_test_accuracy_ci": accuracy_ci([(dict(t.sae_test_accuracy)[k], t.n_test) for t in tasks])
                   for k in KS},
                "tasks": [t.to_dict() for t in tasks],
            }
        datasets[name] = {"counts": ds.counts(), "methods": by_method}
        result = {"scale": scale.name, "hook": common.hook(), "members": scale.members, "width": scale.width,
                  "k": scale.k, "train_tokens": train_tokens(scale, acts, first_budget), "first_budget": first_budget,
                  "config": dataclasses.asdict(cfg), "datasets": datasets,
                  "complete": len(datasets) == len(DATASETS)}  # each finished dataset is written at once
        common.write_result(scale, name_, result, markdown(result))
    plot(result, common.results_dir(scale) / f"{name_}.png")
    return result


def methods_of(result: dict[str, Any]) -> list[str]:
    return list(next(iter(result["datasets"].values()))["methods"])


def mean_over_datasets(result: dict[str, Any], method: str, key: str) -> float:
    """A method's accuracy `key` (e.g. sae_top_1_test_accuracy) averaged over the datasets."""
    return float(np.mean([d["methods"][method][key] for d in result["datasets"].values()]))


def mean_over_datasets_ci(result: dict[str, Any], method: str, k: int) -> dict[str, Any]:
    """mean_over_datasets of the top-k accuracy with its bootstrap interval over every task's test
    documents (each dataset weighs the same), to tell a lead from the test sets' noise."""
    tasks = [(name, t["sae_test_accuracy"][str(k)], t["n_test"]) for name, d in result["datasets"].items()
             for t in d["methods"][method]["tasks"]]
    return accuracy_ci([(a, n) for _, a, n in tasks], groups=[name for name, _, _ in tasks])


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
    c = result["config"]
    return "\n".join([
        f"# Table 4: concept detection (sparse probing), TopK k = {result['k']}, J = {result['members']}"
        f"{budget_title(result)}", "",
        f"Test accuracy of an L2 logistic regression on the top-k latents (mean over one-vs-rest tasks; balanced "
        f"sets; at most {c['max_train_per_class']} train / {c['max_test_per_class']} test documents per class, "
        f"first {c['context_length']} tokens). llm_all_dims: the same probe on all raw activation dims. "
        "Plot: concept_detection.png.", "",
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
