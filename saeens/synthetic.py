"""Synthetic activations with known features: a sparse superposition of unit directions.

x = sum_i c_i f_i + b + noise, where each of F unit features f_i fires independently with
probability active/F and a positive magnitude. Because the true dictionary is known, feature
recovery (mean over true features of the best cosine to a learned decoder row) checks training.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SyntheticData:
    acts_ND: np.ndarray  # float32 [n, d]
    features_FD: np.ndarray  # float32 [F, d], unit rows
    codes_NF: np.ndarray  # float32 [n, F], the true sparse codes


def make_synthetic(
    n: int, d: int, n_features: int, active: float = 4.0, noise: float = 0.01, bias_scale: float = 0.5, seed: int = 0
) -> SyntheticData:
    """`active` features fire per token on average, magnitudes ~ 1 + Exp(1) (never near zero)."""
    rng = np.random.default_rng(seed)
    features_FD = rng.standard_normal((n_features, d)).astype(np.float32)
    features_FD /= np.linalg.norm(features_FD, axis=1, keepdims=True)
    fires_NF = rng.random((n, n_features)) < active / n_features
    mags_NF = 1.0 + rng.exponential(1.0, (n, n_features))
    codes_NF = (fires_NF * mags_NF).astype(np.float32)
    bias_D = bias_scale * rng.standard_normal(d).astype(np.float32)
    acts_ND = codes_NF @ features_FD + bias_D + noise * rng.standard_normal((n, d)).astype(np.float32)
    return SyntheticData(acts_ND.astype(np.float32), features_FD, codes_NF)


def feature_recovery(true_FD: np.ndarray, learned_MD: np.ndarray) -> float:
    """Mean over true features of the max cosine similarity to any learned decoder row."""
    t = true_FD / np.linalg.norm(true_FD, axis=1, keepdims=True)
    l = learned_MD / np.linalg.norm(learned_MD, axis=1, keepdims=True)
    return float(np.mean(np.max(t @ l.T, axis=1)))
