"""Downstream LM loss: splice an SAE / ensemble reconstruction into the model at its hook.

For each test context: next-token cross entropy clean, with the hook activation replaced by the
ensemble's reconstruction (bagging mean, boosting chain, or a single SAE: all `ensemble.reconstruct`),
and with it zeroed; KL(clean || spliced) of the next-token distributions. Position 0 (BOS) keeps
its clean activation in both interventions: the SAEs never saw BOS rows (the cache drops them,
their norm is an outlier) and SAELens' evals exclude special tokens the same way.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from saeens import ensemble
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError


@dataclasses.dataclass(frozen=True)
class SplicedConfig:
    n_contexts: int = 64
    context_length: int = 128
    batch_size: int = 8
    test_fraction: float = 0.1
    seed: int = 0


def _keep_bos(fn):
    def replace(x_BTD):
        return x_BTD.at[:, 1:].set(fn(x_BTD[:, 1:]).astype(x_BTD.dtype))

    return replace


@partial(jax.jit, static_argnums=(0, 4))
def _batch_losses(graphdef, state, ens: Ensemble, tokens_BT: jax.Array, hook: str) -> dict[str, jax.Array]:
    """Summed NLLs (clean, spliced, zero-ablated) and summed KL over the batch's predicted tokens."""
    model = nnx.merge(graphdef, state)

    def run(fn):
        def hook_fn(name, x_BTD):
            return fn(x_BTD) if name == hook else x_BTD

        return jax.nn.log_softmax(model.forward(tokens_BT, hook_fn)[:, :-1].astype(jnp.float32), axis=-1)

    def reconstruct(x_BTD):
        B, T, D = x_BTD.shape
        return ensemble.reconstruct(ens, x_BTD.reshape(B * T, D).astype(jnp.float32)).reshape(B, T, D)

    logp_clean = run(lambda x: x)
    logp_spliced = run(_keep_bos(reconstruct))
    logp_zero = run(_keep_bos(jnp.zeros_like))
    target = tokens_BT[:, 1:, None]

    def nll(logp):
        return -jnp.sum(jnp.take_along_axis(logp, target, axis=-1))

    kl = jnp.sum(jnp.exp(logp_clean) * (logp_clean - logp_spliced))
    return {"clean": nll(logp_clean), "spliced": nll(logp_spliced), "zero": nll(logp_zero), "kl": kl}


def spliced_losses(model, ens: Ensemble, hook: str, contexts_NT: np.ndarray, batch_size: int = 8,
                   progress: bool = False) -> dict[str, float]:
    """CE clean / spliced / zero-ablation, delta_lm_loss, loss_recovered and kl_div (nats per token)."""
    from tqdm.auto import tqdm

    from saeens.models import parse_hook

    parse_hook(hook, model.cfg.n_layers, model.cfg.parallel_residual)
    if ens.cfg.d_in != model.cfg.d_model:
        raise SaeensError(f"the run has d_in={ens.cfg.d_in} but the model's width is {model.cfg.d_model}: use the model the cache came from")
    if len(contexts_NT) == 0:
        raise SaeensError("no test contexts to measure the spliced loss on: use a larger dataset or shorter contexts")
    graphdef, state = nnx.split(model)
    totals = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    n_pred = 0
    for lo in tqdm(range(0, len(contexts_NT), batch_size), disable=not progress, desc="spliced loss", unit="batch"):
        tok = np.asarray(contexts_NT[lo : lo + batch_size], np.int32)
        out = jax.device_get(_batch_losses(graphdef, state, ens, jnp.asarray(tok), hook))
        for k in totals:
            totals[k] += float(out[k])
        n_pred += tok.shape[0] * (tok.shape[1] - 1)
    ce = {k: v / n_pred for k, v in totals.items()}
    return {
        "ce_loss_clean": ce["clean"],
        "ce_loss_spliced": ce["spliced"],
        "ce_loss_zero_ablation": ce["zero"],
        "delta_lm_loss": ce["spliced"] - ce["clean"],
        "loss_recovered": (ce["zero"] - ce["spliced"]) / (ce["zero"] - ce["clean"]),
        "kl_div": ce["kl"],
        "spliced_tokens": n_pred,
    }


def held_out_contexts(tokenizer, dataset: str, cfg: SplicedConfig) -> np.ndarray:
    """Held-out contexts: the same document split (seed, test fraction) `saeens cache` uses."""
    from saeens.data.corpora import load_corpus, split_documents
    from saeens.data.tokens import pack_documents

    _, test = split_documents(load_corpus(dataset), cfg.test_fraction, cfg.seed)
    return pack_documents(test, tokenizer, cfg.context_length, max_contexts=cfg.n_contexts).tokens_NT


def spliced_metrics(run: str | Path, model_name: str, layer: int | None, dataset: str,
                    cfg: SplicedConfig = SplicedConfig(), progress: bool = True) -> dict[str, Any]:
    """`saeens evaluate --model`: the run's hook (or blocks.<layer>.hook_resid_post) on `dataset`."""
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
    model, tokenizer = load_model(model_name)
    contexts = held_out_contexts(tokenizer, dataset, cfg)
    return {"hook": hook, **spliced_losses(model, ens, hook, contexts, cfg.batch_size, progress)}
