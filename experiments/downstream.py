"""What tables 4 and 5 (concept detection, SCR) share: the ensembles they evaluate and the documents
they pool through the model.

The ensembles are table 1's seed-0 TopK runs, or (experiments/downstream_budgets.py) the same
seeds' twins at the first study's budget. Pooling runs the language model once per document batch
for all of them, and keeps each pooled batch in the work directory, so a pass that a session's end
interrupts resumes.
"""

from __future__ import annotations

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
from saeens import ensemble
from saeens.evals.probing import hook_acts, pool_weights, tokenize_texts
from saeens.io.files import atomic_write

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
    scores again without a model pass (the model is still loaded and the texts tokenised). The
    fingerprint covers what a batch depends on (texts, model, hook, context, batch size, every
    ensemble's parameters): a changed input never reads a stale batch."""
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
