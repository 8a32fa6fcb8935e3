"""Bagging's public names; the code lives in saeens/train/bagging.py."""

from saeens.train.bagging import final_ensemble, init_members, make_bagging_step, member_keys, sequential_members

__all__ = ["final_ensemble", "init_members", "make_bagging_step", "member_keys", "sequential_members"]
