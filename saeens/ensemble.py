"""Ensembles as values: J stacked SAEs, weights on their codes, and how they combine.

An Ensemble holds the member params stacked on a leading axis J, the non-negative weights alpha_j
and whether encoding is sequential (boosting: member j encodes the residual of members < j).
Every ensemble decodes the same way, as ONE SAE over the concatenated dictionary:
    codes c = [alpha_1 c^1; ...; alpha_J c^J],   x_hat = c @ [W_dec^1; ...; W_dec^J] + sum_j alpha_j b_dec^j
so features (decoder rows) stay unit norm and the weights sit on the codes. Bagging has
alpha_j = 1/J (the ensemble b_dec is the MEAN of the members'), boosting alpha_j = 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from saeens import sae
from saeens.config import SAEConfig
from saeens.errors import SaeensError
from saeens.sae import Params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Ensemble:
    params: Params  # each leaf stacked on a leading member axis J
    weights: jax.Array  # [J] alpha_j >= 0
    cfg: SAEConfig = dataclasses.field(metadata=dict(static=True))
    sequential: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def n_members(self) -> int:
        return int(self.weights.shape[0])

    @property
    def width(self) -> int:
        return self.n_members * self.cfg.width


def bagging(cfg: SAEConfig, params_J: Params) -> Ensemble:
    J = params_J["W_dec"].shape[0]
    return Ensemble(params_J, jnp.full((J,), 1.0 / J, jnp.float32), cfg, sequential=False)


def boosting(cfg: SAEConfig, params_J: Params) -> Ensemble:
    J = params_J["W_dec"].shape[0]
    return Ensemble(params_J, jnp.ones((J,), jnp.float32), cfg, sequential=True)


def single(cfg: SAEConfig, params: Params) -> Ensemble:
    """One SAE as a one-member ensemble, so every metric and export takes the same value."""
    return Ensemble(jax.tree.map(lambda a: a[None], params), jnp.ones((1,), jnp.float32), cfg)


def member(ens: Ensemble, j: int) -> Params:
    return jax.tree.map(lambda a: a[j], ens.params)


def decoder(ens: Ensemble) -> jax.Array:
    """The concatenated dictionary [J*M, D] (unit-norm rows)."""
    W_dec_JMD = ens.params["W_dec"]
    return W_dec_JMD.reshape(-1, W_dec_JMD.shape[-1])


def decoder_bias(ens: Ensemble) -> jax.Array:
    return ens.weights @ ens.params["b_dec"]


def stage_scan(
    params_J: Params, cfg: SAEConfig, x_BD: jax.Array, active_J: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The boosting chain as ONE lax.scan: stage l encodes the residual the stages before it leave.

    Returns (unweighted codes [J, B, M], final residual [B, D]). active_J (bool [J]) switches
    stages off: an inactive stage passes the residual on and emits zero codes (lax.cond, so it
    costs nothing); training uses it to get the residual of the frozen stages before stage j.
    """

    def forward(p, r_BD):
        x_hat_BD, codes_BM = sae.forward(p, cfg, r_BD)
        return r_BD - x_hat_BD, codes_BM

    def skip(p, r_BD):
        return r_BD, jnp.zeros((r_BD.shape[0], cfg.width), r_BD.dtype)

    def body(r_BD, inputs):
        p, active = inputs
        return forward(p, r_BD) if active is None else jax.lax.cond(active, forward, skip, p, r_BD)

    r_BD, codes_JBM = jax.lax.scan(body, x_BD, (params_J, active_J))
    return codes_JBM, r_BD


def stage_outputs(ens: Ensemble, x_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A sequential ensemble's chain over all its stages: (unweighted codes [J,B,M], final residual)."""
    return stage_scan(ens.params, ens.cfg, x_BD)


def prefix(ens: Ensemble, j: int) -> Ensemble:
    """The sub-ensemble of the first j members (bagging: weights 1/j; boosting: the first j stages)."""
    sub_J = jax.tree.map(lambda a: a[:j], ens.params)
    return boosting(ens.cfg, sub_J) if ens.sequential else bagging(ens.cfg, sub_J)


def encode(ens: Ensemble, x_BD: jax.Array) -> jax.Array:
    """Weighted, concatenated codes [B, J*M] (member-major order, matching `decoder`)."""
    if ens.sequential:
        codes_JBM, _ = stage_outputs(ens, x_BD)
    else:
        codes_JBM = jax.vmap(lambda p: sae.encode(p, ens.cfg, x_BD))(ens.params)
    codes_JBM = codes_JBM * ens.weights[:, None, None]
    J, B, M = codes_JBM.shape
    return codes_JBM.transpose(1, 0, 2).reshape(B, J * M)


def decode(ens: Ensemble, codes_BF: jax.Array) -> jax.Array:
    return codes_BF @ decoder(ens) + decoder_bias(ens)


def reconstruct(ens: Ensemble, x_BD: jax.Array) -> jax.Array:
    return decode(ens, encode(ens, x_BD))


def forward(ens: Ensemble, x_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    codes_BF = encode(ens, x_BD)
    return decode(ens, codes_BF), codes_BF


def to_single(ens: Ensemble) -> tuple[SAEConfig, Params]:
    """The ONE SAE of J*M latents that equals a weighted (non-sequential) ensemble exactly.

    With the shared b_dec = sum_j alpha_j b_dec^j subtracted from the input, member j's
    pre-activation is kept by b_enc' = b_enc^j + (b_dec - b_dec^j) @ W_enc^j; scaling W_enc, b_enc
    and the threshold by alpha_j then scales the codes by alpha_j (ReLU and JumpReLU are positively
    homogeneous). BatchTopK members at inference are per-latent thresholds, i.e. one JumpReLU SAE.
    TopK members are not one global-TopK SAE and boosting encodes sequentially: both refuse.
    """
    if ens.sequential:
        raise SaeensError("a boosting ensemble encodes stage by stage and is not one SAE: use ensemble.encode")
    if ens.cfg.arch == "topk":
        raise SaeensError(
            "TopK members are not one global-TopK SAE: use ensemble.encode/decode, or train relu/jumprelu/batchtopk"
        )
    if bool(jnp.any(ens.weights <= 0)):
        raise SaeensError("to_single needs positive weights: drop members with weight 0 first")
    p, w_J = ens.params, ens.weights
    b_dec_D = decoder_bias(ens)
    shift_JM = jnp.einsum("jd,jdm->jm", b_dec_D - p["b_dec"], p["W_enc"])
    W_enc_JDM = p["W_enc"] * w_J[:, None, None]
    J, D, M = W_enc_JDM.shape
    out = {
        "W_enc": W_enc_JDM.transpose(1, 0, 2).reshape(D, J * M),
        "b_enc": ((p["b_enc"] + shift_JM) * w_J[:, None]).reshape(J * M),
        "W_dec": decoder(ens),
        "b_dec": b_dec_D,
    }
    arch = ens.cfg.arch
    if arch == "jumprelu":
        out["log_threshold"] = (p["log_threshold"] + jnp.log(w_J)[:, None]).reshape(J * M)
    if arch == "batchtopk":
        arch = "jumprelu"
        out["log_threshold"] = jnp.log(p["threshold"] * w_J[:, None]).reshape(J * M)
    return ens.cfg.replace(width=J * M, arch=arch), out
