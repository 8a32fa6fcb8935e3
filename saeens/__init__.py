"""saeens: ensembles of sparse autoencoders (naive bagging, boosting) in JAX/Flax."""

from saeens.config import EnsembleConfig, SAEConfig, TrainConfig
from saeens.errors import SaeensError

__all__ = ["EnsembleConfig", "SAEConfig", "SaeensError", "TrainConfig"]
__version__ = "0.1.0"
