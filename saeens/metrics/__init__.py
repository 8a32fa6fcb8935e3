"""Every metric of the method as pure jnp functions, in three rooms:

- batch.py       per-batch definitions of (x_BD, x_hat_BD, codes_BF): mse, explained_variance, ...
- dictionary.py  functions of decoders: cosines, diversity, stability (and its chance level), Hungarian, shared latents
- stream.py      the same per-batch metrics over a whole chunked split in one pass

`from saeens import metrics; metrics.mse(...)` reaches all of them.
"""

from saeens.metrics.batch import (
    DENSE_THRESHOLD,
    cofiring,
    connectivity,
    dead_fraction,
    dense_fraction,
    explained_variance,
    explained_variance_per_token,
    explained_variance_pooled,
    firing,
    firing_rate,
    fvu,
    l0,
    mse,
    relative_reconstruction_bias,
)
from saeens.metrics.dictionary import (
    COSINE_THRESHOLD,
    best_match,
    cosine_matrix,
    diversity,
    diversity_fraction,
    hungarian_match,
    hungarian_stability,
    max_cosine,
    max_cosines_to_others,
    mean_ci,
    normalize_rows,
    over_chance,
    random_decoders,
    shared_latent_fraction,
    stability,
    stability_chance,
    stability_of_best,
    stability_per_member,
    stability_scores,
)
from saeens.metrics.stream import Stats, evaluate_stream, finalize, init_stats, update_stats, update_stats_jit

__all__ = [
    "COSINE_THRESHOLD",
    "DENSE_THRESHOLD",
    "Stats",
    "cofiring",
    "connectivity",
    "cosine_matrix",
    "dead_fraction",
    "dense_fraction",
    "diversity",
    "diversity_fraction",
    "evaluate_stream",
    "explained_variance",
    "explained_variance_per_token",
    "explained_variance_pooled",
    "best_match",
    "finalize",
    "firing",
    "firing_rate",
    "fvu",
    "hungarian_match",
    "hungarian_stability",
    "init_stats",
    "l0",
    "max_cosine",
    "max_cosines_to_others",
    "mean_ci",
    "mse",
    "normalize_rows",
    "over_chance",
    "random_decoders",
    "relative_reconstruction_bias",
    "shared_latent_fraction",
    "stability",
    "stability_chance",
    "stability_of_best",
    "stability_per_member",
    "stability_scores",
    "update_stats",
    "update_stats_jit",
]
