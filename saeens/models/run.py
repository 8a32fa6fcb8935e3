"""Pure, jitted ways to run a Transformer at a hook site: read it, splice it, cache several.

Each function splits the NNX model into (graphdef, state) and calls a jax.jit-ed function of the
state, with the graphdef and hook names static: a repeated call with the same shapes reuses the
compiled program, and the functions also work inside an outer jax.jit / nnx.jit.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from saeens.models.hooks import parse_hook
from saeens.models.transformer import Transformer

Array = jax.Array


def _check(model: Transformer, hook: str) -> tuple[int, str]:
    cfg = model.cfg
    return parse_hook(hook, cfg.n_layers, cfg.parallel_residual)


def _tokens(tokens_BT) -> Array:
    tokens_BT = jnp.asarray(tokens_BT)
    return tokens_BT[None] if tokens_BT.ndim == 1 else tokens_BT


@functools.partial(jax.jit, static_argnums=(0, 3))
def _to_hook(graphdef, state, tokens_BT: Array, hook: str) -> Array:
    model = nnx.merge(graphdef, state)
    layer, _ = parse_hook(hook)
    seen: dict[str, Array] = {}

    def grab(name: str, x: Array) -> Array:
        if name == hook:
            seen[name] = x
        return x

    model.forward(tokens_BT, grab, stop_layer=layer)  # the rest of that block is dead code for XLA
    return seen[hook]


def run_to_hook(model: Transformer, tokens_BT, hook: str) -> Array:
    """Activations [B, T, D] at `hook`; blocks after the hook's layer and the unembed never run."""
    _check(model, hook)
    graphdef, state = nnx.split(model)
    return _to_hook(graphdef, state, _tokens(tokens_BT), hook)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _splice(graphdef, state, tokens_BT: Array, hook: str, fn: Callable[[Array], Array]) -> Array:
    model = nnx.merge(graphdef, state)

    def replace(name: str, x: Array) -> Array:
        return fn(x).astype(x.dtype) if name == hook else x

    return model.forward(tokens_BT, replace)


def run_with_splice(model: Transformer, tokens_BT, hook: str, fn: Callable[[Array], Array]) -> Array:
    """Logits [B, T, V] with the activation at `hook` replaced by fn(acts).

    `fn` is a static jit argument (compiled once per function object); it may close over arrays,
    e.g. SAE parameters. For a loop over many parameter values, call this inside your own jax.jit.
    """
    _check(model, hook)
    graphdef, state = nnx.split(model)
    return _splice(graphdef, state, _tokens(tokens_BT), hook, fn)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _cache(graphdef, state, tokens_BT: Array, hooks: tuple[str, ...]) -> tuple[Array, dict[str, Array]]:
    model = nnx.merge(graphdef, state)
    seen: dict[str, Array] = {}

    def grab(name: str, x: Array) -> Array:
        if name in hooks:
            seen[name] = x
        return x

    logits_BTV = model.forward(tokens_BT, grab)
    return logits_BTV, seen


def run_with_cache(model: Transformer, tokens_BT, hooks: list[str]) -> tuple[Array, dict[str, Array]]:
    """(logits [B, T, V], {hook: acts [B, T, D]}) from one forward pass."""
    for h in hooks:
        _check(model, h)
    graphdef, state = nnx.split(model)
    return _cache(graphdef, state, _tokens(tokens_BT), tuple(dict.fromkeys(hooks)))


@functools.partial(jax.jit, static_argnums=(0,))
def _logits(graphdef, state, tokens_BT: Array) -> Array:
    return nnx.merge(graphdef, state).forward(tokens_BT)


def logits(model: Transformer, tokens_BT) -> Array:
    """Jitted `model(tokens_BT)`: [B, T, V] float32 logits."""
    graphdef, state = nnx.split(model)
    return _logits(graphdef, state, _tokens(tokens_BT))


def token_nll(logits_BTV: Array, tokens_BT: Array) -> Array:
    """Per-position next-token negative log-likelihood [B, T-1] (nats)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]
