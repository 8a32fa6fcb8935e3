"""One sparse autoencoder as pure functions over a params pytree.

params = {"W_enc": [D, M], "b_enc": [M], "W_dec": [M, D], "b_dec": [D]} in SAELens' storage, plus
"log_threshold" [M] for JumpReLU (trained through the straight-through estimator) and "threshold"
[M] for BatchTopK (the inference threshold: an EMA set by the train step, never by gradients).
The activation is data (cfg.arch), dispatched in `activate`, not a class hierarchy, so the same
functions vmap over ensemble members and scan over boosting stages. The sparsity coefficients the
loss reads (`Coefficients`) may be traced values, so a sweep's members differ in them as data.
cfg.compute_dtype = "bfloat16" runs the training matmuls and codes in bf16; params, gradients and
losses stay float32.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from saeens import kernels
from saeens.config import SAEConfig
from saeens.precision import matmul

Params = dict[str, jax.Array]
Coefficients = dict[str, jax.Array | float]  # l1_coeff, l0_coeff, jumprelu_bandwidth
COEFFICIENTS = ("l1_coeff", "l0_coeff", "jumprelu_bandwidth")


def coefficients(cfg: SAEConfig) -> Coefficients:
    """The config's sparsity coefficients (what `loss` reads unless a sweep passes its own)."""
    return {name: getattr(cfg, name) for name in COEFFICIENTS}


def compute_dtype(cfg: SAEConfig) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype)


def init(key: jax.Array, cfg: SAEConfig, b_dec_D: jax.Array | None = None) -> Params:
    """Unit-norm random decoder rows, encoder tied to the decoder's transpose, zero biases."""
    W_dec_MD = jax.random.normal(key, (cfg.width, cfg.d_in), jnp.float32)
    W_dec_MD = W_dec_MD / jnp.linalg.norm(W_dec_MD, axis=-1, keepdims=True)
    params = {
        "W_enc": W_dec_MD.T,
        "b_enc": jnp.zeros((cfg.width,), jnp.float32),
        "W_dec": W_dec_MD,
        "b_dec": jnp.zeros((cfg.d_in,), jnp.float32) if b_dec_D is None else jnp.asarray(b_dec_D, jnp.float32),
    }
    if cfg.arch == "jumprelu":
        params["log_threshold"] = jnp.full((cfg.width,), jnp.log(cfg.jumprelu_init_threshold), jnp.float32)
    if cfg.arch == "batchtopk":
        params["threshold"] = jnp.zeros((cfg.width,), jnp.float32)
    return params


def pre_activations(params: Params, x_BD: jax.Array) -> jax.Array:
    return (x_BD - params["b_dec"]) @ params["W_enc"] + params["b_enc"]


def topk_codes(pre_BM: jax.Array, k: int) -> jax.Array:
    """Keep each row's k largest pre-activations (ReLU'd), zero elsewhere."""
    vals_BK, idx_BK = jax.lax.top_k(pre_BM, k)
    rows_B1 = jnp.arange(pre_BM.shape[0])[:, None]
    return jnp.zeros_like(pre_BM).at[rows_B1, idx_BK].set(jax.nn.relu(vals_BK))


def batch_topk_codes(pre_BM: jax.Array, k: int) -> jax.Array:
    """Keep the k*B largest pre-activations of the whole batch (Bussmann et al.), ReLU'd."""
    B, M = pre_BM.shape
    flat = topk_codes(pre_BM.reshape(1, B * M), k * B)
    return flat.reshape(B, M)


def _rectangle(u: jax.Array) -> jax.Array:
    return (jnp.abs(u) < 0.5).astype(u.dtype)


# The bandwidth eps is an ordinary (traced) argument with a zero cotangent, not a static one, so
# a sweep's members may differ in it inside one compiled step.
@jax.custom_vjp
def _jumprelu(z_BM: jax.Array, theta_M: jax.Array, eps: jax.Array | float) -> jax.Array:
    return z_BM * (z_BM > theta_M)


def _jumprelu_fwd(z_BM, theta_M, eps):
    return _jumprelu(z_BM, theta_M, eps), (z_BM, theta_M, eps)


def _jumprelu_bwd(res, g_BM):
    z_BM, theta_M, eps = res
    dz = g_BM * (z_BM > theta_M)
    # Rajamanoharan et al. 2024: d/dtheta JumpReLU ~ -(theta/eps) K((z - theta)/eps)
    dtheta = -(theta_M / eps) * _rectangle((z_BM - theta_M) / eps) * g_BM
    return dz, dtheta.reshape(-1, theta_M.shape[-1]).sum(0).astype(theta_M.dtype), jnp.zeros_like(eps)


_jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@jax.custom_vjp
def _step(z_BM: jax.Array, theta_M: jax.Array, eps: jax.Array | float) -> jax.Array:
    return (z_BM > theta_M).astype(z_BM.dtype)


def _step_fwd(z_BM, theta_M, eps):
    return _step(z_BM, theta_M, eps), (z_BM, theta_M, eps)


def _step_bwd(res, g_BM):
    z_BM, theta_M, eps = res
    dtheta = -(1.0 / eps) * _rectangle((z_BM - theta_M) / eps) * g_BM
    return jnp.zeros_like(z_BM), dtheta.reshape(-1, theta_M.shape[-1]).sum(0).astype(theta_M.dtype), jnp.zeros_like(eps)


_step.defvjp(_step_fwd, _step_bwd)


def threshold(params: Params) -> jax.Array:
    """The per-latent JumpReLU threshold (positive by construction)."""
    return jnp.exp(params["log_threshold"])


def activate(
    params: Params, cfg: SAEConfig, pre_BM: jax.Array, train: bool = False, bandwidth: jax.Array | float | None = None
) -> jax.Array:
    """Pre-activations -> sparse codes. BatchTopK uses the batch rule in training only; bandwidth
    (JumpReLU's STE width, default the config's) only shapes gradients."""
    if cfg.arch == "relu":
        return jax.nn.relu(pre_BM)
    if cfg.arch == "topk":
        return topk_codes(pre_BM, cfg.k)
    if cfg.arch == "batchtopk":
        if train:
            return batch_topk_codes(pre_BM, cfg.k)
        return pre_BM * (pre_BM > params["threshold"])
    eps = cfg.jumprelu_bandwidth if bandwidth is None else bandwidth
    return _jumprelu(jax.nn.relu(pre_BM), threshold(params), eps)


def encode(params: Params, cfg: SAEConfig, x_BD: jax.Array) -> jax.Array:
    return activate(params, cfg, pre_activations(params, x_BD))


def decode(params: Params, codes_BM: jax.Array) -> jax.Array:
    return codes_BM @ params["W_dec"] + params["b_dec"]


def forward(params: Params, cfg: SAEConfig, x_BD: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Inference: (reconstruction, codes)."""
    codes_BM = encode(params, cfg, x_BD)
    return decode(params, codes_BM), codes_BM


def auxk_loss(
    pre_BM: jax.Array, err_BD: jax.Array, dead_M: jax.Array, W_dec_MD: jax.Array, k_aux: int
) -> jax.Array:
    """Gao et al. AuxK: the top-k_aux DEAD latents reconstruct the residual error err = x - x_hat.

    On the main loss's scale (squared error summed over d, mean over tokens), so aux_coeff = 1/32
    weighs it as in Gao et al.; err is the error of the SAE's own input (for a boosting stage,
    its residual). Zero when no latent is dead. The decoder product runs in pre_BM's dtype.
    """
    masked_BM = jnp.where(dead_M, pre_BM, -jnp.inf)
    aux_codes_BM = topk_codes(masked_BM, k_aux)
    err_hat_BD = matmul(aux_codes_BM, W_dec_MD, pre_BM.dtype)
    target_BD = jax.lax.stop_gradient(err_BD)
    loss = jnp.mean(jnp.sum((err_hat_BD - target_BD) ** 2, axis=-1))
    return jnp.where(jnp.any(dead_M), loss, 0.0)


def _centred_product(x_BD: jax.Array, b_D: jax.Array, W_DM: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """(x - b) @ W with b's gradient formed as -(sum of the cotangent over tokens) @ W^T: autodiff
    would take a [B, d] x [d, m] product for it and then sum (measured: 15-25% of a dense step).
    The value is (x - b) @ W exactly: the second term is a zero vector whose only use is its gradient."""
    b_const_D = jax.lax.stop_gradient(b_D)
    return matmul(x_BD - b_const_D, W_DM, dtype) - matmul(b_D - b_const_D, W_DM, dtype)


def loss(
    params: Params, cfg: SAEConfig, x_BD: jax.Array, dead_M: jax.Array, coeffs: Coefficients | None = None
) -> tuple[jax.Array, dict[str, Any]]:
    """Training loss: per-token squared error summed over d, mean over tokens, + sparsity/aux terms.

    aux: mse, sparsity_loss, codes [B, M] and the summaries a train step needs (fired [M], l0,
    min_kept). cfg.kernel == "sparse" (topk/batchtopk) computes the same loss and gradients with
    saeens/kernels.py, whose backward pass touches only the selected latents. coeffs (default
    `coefficients(cfg)`) may be traced: a sweep member's own l1/l0 coefficient and bandwidth.
    """
    if uses_sparse_kernel(cfg):
        return kernels.sparse_loss(params, cfg, x_BD, dead_M)
    c = coefficients(cfg) if coeffs is None else coeffs
    dtype = compute_dtype(cfg)
    pre_BM = (_centred_product(x_BD, params["b_dec"], params["W_enc"], dtype) + params["b_enc"]).astype(dtype)
    codes_BM = activate(params, cfg, pre_BM, train=True, bandwidth=c["jumprelu_bandwidth"])
    x_hat_BD = matmul(codes_BM, params["W_dec"], dtype) + params["b_dec"]
    err_BD = x_BD - x_hat_BD
    mse = jnp.mean(jnp.sum(err_BD**2, axis=-1))
    if cfg.arch == "relu":
        dec_norm_M = jnp.linalg.norm(params["W_dec"], axis=-1)
        sparsity = c["l1_coeff"] * jnp.mean(jnp.sum(codes_BM * dec_norm_M, axis=-1))
    elif cfg.arch == "jumprelu":
        gates_BM = _step(jax.nn.relu(pre_BM), threshold(params), c["jumprelu_bandwidth"])
        sparsity = c["l0_coeff"] * jnp.mean(jnp.sum(gates_BM, axis=-1, dtype=jnp.float32))
    else:
        sparsity = cfg.aux_coeff * auxk_loss(pre_BM, err_BD, dead_M, params["W_dec"], cfg.k_aux)
    on_BM = jax.lax.stop_gradient(codes_BM) > 0
    aux = {
        "mse": mse,
        "sparsity_loss": sparsity,
        "codes": codes_BM,
        "fired": jnp.any(on_BM, axis=0),
        "l0": jnp.mean(jnp.sum(on_BM, axis=-1)),
        "min_kept": jnp.min(jnp.where(on_BM, jax.lax.stop_gradient(codes_BM), jnp.inf)).astype(jnp.float32),
    }
    return mse + sparsity, aux


def uses_sparse_kernel(cfg: SAEConfig) -> bool:
    """Whether training runs saeens/kernels.py's sparse TopK loss (TopK-style codes only)."""
    return cfg.kernel == "sparse" and cfg.arch in ("topk", "batchtopk")


def update_inference_threshold(params: Params, cfg: SAEConfig, min_kept: jax.Array) -> Params:
    """BatchTopK's inference threshold after a train step: an EMA of the smallest code the batch
    rule kept (min_kept, from `loss`'s summaries); the first step sets it. Other archs: unchanged.

    One threshold for every latent (stored per latent, so inference and export read it like
    JumpReLU's). A batch that kept nothing (min_kept = inf) leaves it as it was.
    """
    if cfg.arch != "batchtopk":
        return params
    old = params["threshold"][0]
    min_kept = jnp.where(jnp.isfinite(min_kept), min_kept, old)
    decay = cfg.batchtopk_threshold_decay
    new = jnp.where(jnp.all(params["threshold"] == 0), min_kept, decay * old + (1 - decay) * min_kept)
    return params | {"threshold": jnp.full_like(params["threshold"], new)}


def geometric_median(x_ND: jax.Array, n_iter: int = 50, eps: float = 1e-6) -> jax.Array:
    """Weiszfeld's algorithm from the mean: the point minimising the summed Euclidean distance."""

    def body(_, y_D):
        w_N = 1.0 / jnp.maximum(jnp.linalg.norm(x_ND - y_D, axis=-1), eps)
        return (w_N @ x_ND) / jnp.sum(w_N)

    return jax.lax.fori_loop(0, n_iter, body, x_ND.mean(0))


def fold_scale(params: Params, cfg: SAEConfig, scale: jax.Array | float) -> Params:
    """SAE trained on s*x -> the same SAE on x, decoder rows still unit norm.

    ReLU, TopK and JumpReLU are positively homogeneous, so g'(s x)/s equals an SAE with
    b_enc/s, b_dec/s and thresholds/s and the same W_enc, W_dec (codes scale by 1/s).
    """
    out = dict(params)
    out["b_enc"] = params["b_enc"] / scale
    out["b_dec"] = params["b_dec"] / scale
    if "log_threshold" in params:
        out["log_threshold"] = params["log_threshold"] - jnp.log(scale)
    if "threshold" in params:
        out["threshold"] = params["threshold"] / scale
    return out
