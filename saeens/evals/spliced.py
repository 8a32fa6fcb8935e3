"""Downstream LM loss: splice an SAE / ensemble reconstruction into the model at its hook.

For each test context: next-token cross entropy clean, with the hook activation replaced by the
ensemble's reconstruction (bagging mean, boosting chain, or a single SAE: all `ensemble.reconstruct`),
and with it zeroed; KL(clean || spliced) of the next-token distributions. Position 0 (BOS) keeps
its clean activation in both interventions: the SAEs never saw BOS rows (the cache drops them,
their norm is an outlier) and SAELens' evals exclude special tokens the same way. For the same
reason a massive-activation row (norm above the cache's test-split threshold, data/outliers.py:
rows training and metrics skip) keeps its clean activation too.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saeens import ensemble
from saeens.config import SplicedConfig
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError


def _keep_bos(fn, clean_above: jax.Array):
    """fn applied to every position but BOS and rows whose norm exceeds clean_above (kept clean)."""

    def replace(x_BTD):
        x_BSD = x_BTD[:, 1:]
        flagged_BS1 = jnp.linalg.norm(x_BSD.astype(jnp.float32), axis=-1, keepdims=True) > clean_above
        return x_BTD.at[:, 1:].set(jnp.where(flagged_BS1, x_BSD, fn(x_BSD).astype(x_BTD.dtype)))

    return replace


def _log_probs(model, tokens_BT: jax.Array, hook: str, fn) -> jax.Array:
    """Next-token log-probs [B, T-1, V] with the hook activation replaced by fn(x) (None: clean)."""

    def hook_fn(name, x_BTD):
        return fn(x_BTD) if fn is not None and name == hook else x_BTD

    return jax.nn.log_softmax(model.forward(tokens_BT, hook_fn)[:, :-1].astype(jnp.float32), axis=-1)


def _nll(logp: jax.Array, tokens_BT: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1))


def _splice(ens: Ensemble, clean_above: jax.Array):
    def reconstruct(x_BTD):
        B, T, D = x_BTD.shape
        return ensemble.reconstruct(ens, x_BTD.reshape(B * T, D).astype(jnp.float32)).reshape(B, T, D)

    return _keep_bos(reconstruct, clean_above)


@partial(jax.jit, static_argnums=(0, 4))
def _batch_losses(graphdef, state, ens: Ensemble, tokens_BT: jax.Array, hook: str,
                  clean_above: jax.Array) -> dict[str, jax.Array]:
    """Summed NLLs (clean, spliced, zero-ablated) and summed KL over the batch's predicted tokens."""
    model = nnx.merge(graphdef, state)
    logp_clean = _log_probs(model, tokens_BT, hook, None)
    logp_spliced = _log_probs(model, tokens_BT, hook, _splice(ens, clean_above))
    logp_zero = _log_probs(model, tokens_BT, hook, _keep_bos(jnp.zeros_like, clean_above))
    kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_spliced))
    return {"clean": _nll(logp_clean, tokens_BT), "spliced": _nll(logp_spliced, tokens_BT),
            "zero": _nll(logp_zero, tokens_BT), "kl": kl}


@partial(jax.jit, static_argnums=(0, 3))
def _batch_baseline(graphdef, state, tokens_BT: jax.Array, hook: str, clean_above: jax.Array) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state)
    return {"clean": _nll(_log_probs(model, tokens_BT, hook, None), tokens_BT),
            "zero": _nll(_log_probs(model, tokens_BT, hook, _keep_bos(jnp.zeros_like, clean_above)), tokens_BT)}


@partial(jax.jit, static_argnums=(0, 4))
def _batch_spliced(graphdef, state, ens: Ensemble, tokens_BT: jax.Array, hook: str,
                   clean_above: jax.Array) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, state)
    return {"spliced": _nll(_log_probs(model, tokens_BT, hook, _splice(ens, clean_above)), tokens_BT)}


def outlier_threshold(meta: dict[str, Any], split: str = "test") -> float | None:
    """The norm above which a cache flags `split`'s rows, or a held-out stream its rows (None: no rule)."""
    recorded = ((meta.get("outliers") or {}).get("splits") or {}).get(split, {}).get("threshold")
    return recorded if recorded is not None else meta.get("outlier_threshold")


def _check(model, hook: str, contexts_NT: np.ndarray, d_in: int | None = None) -> None:
    from saeens.models import parse_hook

    parse_hook(hook, model.cfg.n_layers, model.cfg.parallel_residual)
    if d_in is not None and d_in != model.cfg.d_model:
        raise SaeensError(f"the run has d_in={d_in} but the model's width is {model.cfg.d_model}: use the model the cache came from")
    if len(contexts_NT) == 0:
        raise SaeensError("no test contexts to measure the spliced loss on: use a larger dataset or shorter contexts")


def _per_token(batch_fn, contexts_NT: np.ndarray, batch_size: int, progress: bool) -> dict[str, float]:
    """batch_fn(tokens_BT) -> summed quantities; their sums over all batches / predicted tokens."""
    from tqdm.auto import tqdm

    totals: dict[str, float] = {}
    n_pred = 0
    for lo in tqdm(range(0, len(contexts_NT), batch_size), disable=not progress, desc="spliced loss", unit="batch"):
        tok = np.asarray(contexts_NT[lo : lo + batch_size], np.int32)
        for k, v in jax.device_get(batch_fn(jnp.asarray(tok))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n_pred += tok.shape[0] * (tok.shape[1] - 1)
    return {k: v / n_pred for k, v in totals.items()} | {"n_pred": n_pred}


def baseline_losses(model, hook: str, contexts_NT: np.ndarray, batch_size: int = 8,
                    progress: bool = False, clean_above: float | None = None) -> dict[str, float]:
    """The clean and zero-ablation CE of the contexts (nats per token): they do not depend on the
    ensemble, so a sweep over many ensembles computes them once and passes them to spliced_losses.
    clean_above: rows with a larger norm keep their clean activation (None: only BOS does)."""
    _check(model, hook, contexts_NT)
    graphdef, state = nnx.split(model)
    above = _bound(clean_above)
    ce = _per_token(lambda tok: _batch_baseline(graphdef, state, tok, hook, above), contexts_NT, batch_size, progress)
    return {"ce_loss_clean": ce["clean"], "ce_loss_zero_ablation": ce["zero"], "spliced_tokens": ce["n_pred"]}


def _bound(clean_above: float | None) -> jax.Array:
    return jnp.float32(jnp.inf if clean_above is None else clean_above)


def spliced_losses(model, ens: Ensemble, hook: str, contexts_NT: np.ndarray, batch_size: int = 8,
                   progress: bool = False, baseline: dict[str, float] | None = None,
                   clean_above: float | None = None) -> dict[str, float]:
    """CE clean / spliced / zero-ablation, delta_lm_loss, loss_recovered and kl_div (nats per token).

    With `baseline` (baseline_losses of the same contexts) only the spliced pass runs, a third of
    the model forwards, and kl_div is left out (it needs the clean distributions). clean_above:
    rows with a larger norm keep their clean activation in both interventions (None: only BOS)."""
    _check(model, hook, contexts_NT, ens.cfg.d_in)
    graphdef, state = nnx.split(model)
    above = _bound(clean_above)
    if baseline is None:
        ce = _per_token(lambda tok: _batch_losses(graphdef, state, ens, tok, hook, above), contexts_NT, batch_size,
                        progress)
        clean, zero, extra = ce["clean"], ce["zero"], {"kl_div": ce["kl"]}
    else:
        ce = _per_token(lambda tok: _batch_spliced(graphdef, state, ens, tok, hook, above), contexts_NT, batch_size,
                        progress)
        if ce["n_pred"] != baseline["spliced_tokens"]:
            raise SaeensError("the baseline losses were computed on other contexts: pass baseline_losses of these contexts")
        clean, zero, extra = baseline["ce_loss_clean"], baseline["ce_loss_zero_ablation"], {}
    return {
        "ce_loss_clean": clean,
        "ce_loss_spliced": ce["spliced"],
        "ce_loss_zero_ablation": zero,
        "delta_lm_loss": ce["spliced"] - clean,
        "loss_recovered": (zero - ce["spliced"]) / (zero - clean) if zero != clean else float("nan"),
        **extra,
        "spliced_tokens": ce["n_pred"],
    }


def spliced_metrics(run: str | Path, acts, model_name: str, layer: int | None, dataset: str | None = None,
                    cfg: SplicedConfig = SplicedConfig(), progress: bool = True) -> dict[str, Any]:
    """`saeens evaluate --model`: the run's hook (or blocks.<layer>.hook_resid_post) on the held-out
    contexts of the cache `acts` (data.build.held_out_contexts); `dataset` names the corpus when the
    cache does not record it."""
    from saeens.data.build import held_out_contexts, source_documents
    from saeens.models import hook_name, load_model
    from saeens.train import load_ensemble

    ens, meta = load_ensemble(run)
    hook = meta.get("hook")
    if layer is not None:
        if hook is not None and hook != hook_name(layer, "resid_post"):
            raise SaeensError(f"the run was trained at {hook}, not at layer {layer}'s resid_post: drop --layer")
        hook = hook_name(layer, "resid_post")
    if hook is None:
        raise SaeensError(f"the run in {run} does not record its hook: pass --layer L")
    documents = source_documents(acts, dataset)  # before the model: a missing corpus fails fast
    model, tokenizer = load_model(model_name)
    contexts = held_out_contexts(acts, tokenizer, cfg.n_contexts, documents)
    return {"hook": hook, **spliced_losses(model, ens, hook, contexts, cfg.batch_size, progress,
                                           clean_above=outlier_threshold(acts.meta))}
