"""Do other members and other runs find a feature too? Best matches, stability, consensus.

A feature is one latent of one member: row f of the concatenated dictionary (member-major, as
`saeens.ensemble.decoder` orders it), member f // m, latent f % m. Two features "match" when the
cosine of their decoder rows is at least `COSINE_THRESHOLD` (0.7, the diversity threshold).

- consensus count: how many of the J members hold a match of the feature (its own member counts),
- stability: the fraction of the other, independently trained runs whose dictionary holds a match,
- the consensus ensemble: the same ensemble with the codes of features whose consensus count is
  below t set to zero, i.e. x_hat = sum over kept features f of c_f W_dec_f + b_dec, where c_f is
  the feature's (weighted) code in the full ensemble (boosting stages still encode the residual of
  every earlier feature). For relu / jumprelu / batchtopk bagging that is one SAE: `consensus_sae`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from saeens import ensemble
from saeens.config import SAEConfig
from saeens.ensemble import Ensemble
from saeens.errors import SaeensError
from saeens.metrics import COSINE_THRESHOLD, best_match
from saeens.sae import Params


def encoder_rows(ens: Ensemble) -> jax.Array:
    """Encoder vectors as rows [J*M, D] in the decoder's order (W_enc is stored [J, D, M])."""
    W_enc_JDM = ens.params["W_enc"]
    return W_enc_JDM.transpose(0, 2, 1).reshape(-1, W_enc_JDM.shape[1])


def member_matches(ens: Ensemble) -> dict[str, np.ndarray]:
    """Every feature's best match in every member, by decoder and by encoder cosine.

    Returns [F, J] arrays dec_latent, dec_cos, enc_latent, enc_cos (latent index within member j;
    a feature's own member gives itself with cosine 1) and consensus [F]: the members holding a
    decoder match with cosine >= 0.7.
    """
    J, M = ens.n_members, ens.cfg.width
    dec_FD, enc_FD = ensemble.decoder(ens), encoder_rows(ens)
    out = {k: np.empty((J * M, J), np.int32 if k.endswith("latent") else np.float32)
           for k in ("dec_latent", "dec_cos", "enc_latent", "enc_cos")}
    for name, rows_FD in (("dec", dec_FD), ("enc", enc_FD)):
        rows_JMD = rows_FD.reshape(J, M, -1)
        for j in range(J):
            idx_F, cos_F = best_match(rows_FD, rows_JMD[j])
            out[f"{name}_latent"][:, j] = np.asarray(idx_F)
            out[f"{name}_cos"][:, j] = np.asarray(cos_F)
    own_F = np.arange(J * M) // M
    for name in ("dec", "enc"):
        out[f"{name}_latent"][np.arange(J * M), own_F] = np.arange(J * M) % M
        out[f"{name}_cos"][np.arange(J * M), own_F] = 1.0
    out["consensus"] = np.sum(out["dec_cos"] >= COSINE_THRESHOLD, axis=1).astype(np.int32)
    return out


def run_matches(ens: Ensemble, other_decoders: list[jax.Array]) -> dict[str, np.ndarray]:
    """Best decoder match of every feature in each other run's dictionary [F, R] (feature, cos) and
    stability [F]: the fraction of those runs holding a match with cosine >= 0.7 (NaN without runs)."""
    dec_FD = ensemble.decoder(ens)
    F, R = dec_FD.shape[0], len(other_decoders)
    feature_FR, cos_FR = np.zeros((F, R), np.int32), np.zeros((F, R), np.float32)
    for r, W_GD in enumerate(other_decoders):
        if W_GD.shape[1] != dec_FD.shape[1]:
            raise SaeensError(f"run {r} has d_in={W_GD.shape[1]}, this one {dec_FD.shape[1]}: compare runs on the same activations")
        idx_F, c_F = best_match(dec_FD, jnp.asarray(W_GD))
        feature_FR[:, r], cos_FR[:, r] = np.asarray(idx_F), np.asarray(c_F)
    stability_F = np.mean(cos_FR >= COSINE_THRESHOLD, axis=1) if R else np.full(F, np.nan, np.float32)
    return {"feature": feature_FR, "cos": cos_FR, "stability": stability_F.astype(np.float32)}


def consensus_keep(consensus_F: np.ndarray, t: int, n_members: int) -> np.ndarray:
    """Boolean [F]: the features that at least t of the J members share."""
    if not 1 <= t <= n_members:
        raise SaeensError(f"consensus threshold t={t} must lie in 1..{n_members} (the number of members): pass --consensus-t")
    return np.asarray(consensus_F) >= t


def consensus_forward(ens: Ensemble, keep_F: jax.Array, x_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x_hat, codes of the kept features [B, F_kept]): the full ensemble's codes, the others zeroed.

    keep_F holds the kept features' indices (int [F_kept]); dropping a column is zeroing it."""
    codes_BF = ensemble.encode(ens, x_BD)
    kept_BK = codes_BF[:, keep_F]
    return kept_BK @ ensemble.decoder(ens)[keep_F] + ensemble.decoder_bias(ens), kept_BK


def consensus_sae(ens: Ensemble, keep_F: np.ndarray) -> tuple[SAEConfig, Params]:
    """The consensus ensemble of a relu / jumprelu / batchtopk bagging run as ONE SAE: the exact
    single SAE of the ensemble (`ensemble.to_single`) without the latents that are not kept (each
    of its latents is gated on its own pre-activation, so dropping a latent zeroes its code)."""
    cfg, p = ensemble.to_single(ens)
    idx = np.flatnonzero(np.asarray(keep_F))
    if idx.size == 0:
        raise SaeensError("no feature reaches the consensus threshold: lower --consensus-t")
    out = {"W_enc": p["W_enc"][:, idx], "b_enc": p["b_enc"][idx], "W_dec": p["W_dec"][idx], "b_dec": p["b_dec"]}
    if "log_threshold" in p:
        out["log_threshold"] = p["log_threshold"][idx]
    return cfg.replace(width=int(idx.size)), out
