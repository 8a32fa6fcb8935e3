"""Training: one SAE's step (step.py), bagging and boosting built on it, the method registry
(methods.py), the host loop `fit` (loop.py) and its checkpoints; finished ensembles are saved and
loaded by saeens/runs.py (re-exported here)."""

from saeens.runs import load_ensemble, save_ensemble
from saeens.train.loop import Activations, fit, init_sample
from saeens.train.methods import Method, build_method
from saeens.train.step import TrainState, init_state, make_step, norm_scale, update

__all__ = [
    "Activations", "Method", "TrainState", "build_method", "fit", "init_sample", "init_state", "load_ensemble",
    "make_step", "norm_scale", "save_ensemble", "update",
]
