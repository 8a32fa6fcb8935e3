"""Boosting's public names; the code lives in saeens/train/boosting.py."""

from saeens.train.boosting import (
    final_ensemble, init_stages, make_boosting_step, make_prepare, residual_before, stage_state, start_stage, with_stage,
)

__all__ = ["final_ensemble", "init_stages", "make_boosting_step", "make_prepare", "residual_before", "stage_state",
           "start_stage", "with_stage"]
