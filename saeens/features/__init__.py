"""Look at the features of an ensemble: per-feature statistics from one streaming pass over a cache
split, the text behind their top activations, logit effects, agreement across members and runs,
the consensus ensemble, and a static HTML dashboard (`saeens features`)."""

from saeens.features.agreement import (
    best_match,
    consensus_forward,
    consensus_keep,
    consensus_sae,
    member_matches,
    run_matches,
)
from saeens.features.analysis import FeaturesConfig, analyse, select_features
from saeens.features.build import build
from saeens.features.logits import logit_effects
from saeens.features.stats import feature_pass, hist_edges

__all__ = [
    "FeaturesConfig",
    "analyse",
    "best_match",
    "build",
    "consensus_forward",
    "consensus_keep",
    "consensus_sae",
    "feature_pass",
    "hist_edges",
    "logit_effects",
    "member_matches",
    "run_matches",
    "select_features",
]
