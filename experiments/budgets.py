"""Evaluations at intermediate budgets of ONE training run, taken as it trains.

The learning rate is constant (saeens/optim.py) and batch `s` depends only on (seed, s), so the
state of a run after S steps is the state a run of S steps would end with, provided batch size, lr
and dead_tokens are held fixed (the experiment scales hold them fixed across budgets). A run is
therefore trained once, to its largest budget, and stopped at each smaller one on the way
(`fit(stop_after=...)` returns the ensemble at that step; a checkpoint there lets the next leg
resume). Boosting is the exception: its stage length is the budget, so each budget is its own run.

Each evaluation is written twice: beside the run directory (in <run>.evals/, which `fit`, owner of
the run directory, never sees; read back on a rerun) and as a small committable file under
<results>/budgets/ (the run's name and steps), so a session that is cut short still leaves its
finished evaluations to commit. The committed copy is the study's memory: a session's machine starts
with an empty work directory, so a record found only there is read back, not evaluated again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from experiments import common
from saeens.config import RunConfig


def budget_steps(run: RunConfig, tokens: Sequence[int]) -> list[int]:
    """Step counts of the budgets below the run's own (rounded to whole checkpoints, at least one),
    ascending, plus the run's last step."""
    ce = max(run.train.checkpoint_every, 1)
    steps = {max(ce, round(t / run.train.batch_size / ce) * ce) for t in tokens}
    return sorted(s for s in steps if s < run.train.n_steps) + [run.train.n_steps]


def evals_dir(scale: common.Scale, name: str) -> Path:
    """Where a run's budget evaluations (and anything an evaluation keeps, e.g. decoders) live."""
    d = common.runs_dir(scale) / f"{name}.evals"
    d.mkdir(parents=True, exist_ok=True)
    return d


def record_path(scale: common.Scale, name: str, steps: int) -> Path:
    """Where run `name`'s evaluation at `steps` (one stage's steps for boosting) is kept."""
    return evals_dir(scale, name) / f"eval-budget-{steps}.json"


def committed_path(scale: common.Scale, name: str, steps: int) -> Path:
    """The committable copy of record_path's record (<results>/budgets/<name>-<steps>.json)."""
    return common.results_dir(scale) / "budgets" / f"{name}-{steps}.json"


def read_record(scale: common.Scale, name: str, steps: int) -> dict[str, Any] | None:
    """Run `name`'s evaluation at `steps` from the work directory or, when an earlier session made it,
    from its committed copy; None when neither exists."""
    for path in (record_path(scale, name, steps), committed_path(scale, name, steps)):
        if path.is_file():
            return json.loads(path.read_text())
    return None


def keep_decoder(keep: Path, ens, steps: int) -> None:
    """Save the ensemble's decoder at this budget beside its evaluation: stability at a budget needs
    every run's decoder there, and the runs only hold their latest state."""
    import numpy as np

    from saeens import ensemble
    from saeens.io.files import atomic_save_npy

    atomic_save_npy(decoder_path(keep, steps), np.asarray(ensemble.decoder(ens), np.float32))


def decoder_path(keep: Path, steps: int) -> Path:
    return keep / f"decoder-{steps}.npy"


def _latest_step(run_dir: Path) -> int:
    from saeens.train import checkpoints

    if not (run_dir / "checkpoints").is_dir():
        return 0
    return checkpoints.manager(run_dir).latest_step() or 0


def train_with_budgets(scale: common.Scale, name: str, run: RunConfig, acts, tokens: Sequence[int],
                       evaluate: Callable[[Any, int], dict[str, Any]], progress: bool = True,
                       decoders: bool = False) -> list[dict[str, Any]]:
    """Train `name` to each budget in `tokens` and to its end, evaluating (evaluate(ensemble, steps) ->
    metrics) and keeping the decoder (stability at that budget) at each; one record per budget: steps,
    tokens (steps x batch) and the metrics. A budget whose record exists (here or committed) is read
    back; with `decoders`, a run that must be trained anyway (its ensemble is not here, e.g. retrained
    in a new session for its decoder) still stops at such a budget to keep its decoder. A budget that
    the run has already passed without an evaluation (it was trained before) is left out. Boosting:
    tokens must be empty, and steps and tokens are those of one stage (its budget)."""
    from saeens.train import fit, load_ensemble

    boosting = run.ensemble.method == "boosting"
    if boosting and tokens:
        raise ValueError("boosting's stage length is its budget: train one boosting run per budget, with tokens=()")
    per = run.ensemble.members if boosting else 1  # fit counts the steps of every stage; a record, those of one
    rd = common.runs_dir(scale) / name
    records = []
    for steps in budget_steps(run, tokens):
        rec = read_record(scale, name, steps)
        kept = decoder_path(evals_dir(scale, name), steps)
        if rec is None or (decoders and not kept.is_file()):
            done = _latest_step(rd)
            if (rd / "ensemble.json").is_file() and steps == run.train.n_steps:
                ens, _ = load_ensemble(rd)
            elif done > steps * per or (rec is not None and (rd / "ensemble.json").is_file()):
                ens = None  # passed before budgets (or decoders) were asked for: nothing to take at this step
            else:
                if progress:
                    print(f"training {name} to step {steps * per} of {run.train.n_steps * per}")
                with common.clock(common.wall_seconds_path(rd)):
                    ens = fit(rd, run, acts, progress=progress, stop_after=steps * per - done)
            if ens is not None:
                keep_decoder(evals_dir(scale, name), ens, steps)
                if rec is None:
                    rec = common.cached_json(record_path(scale, name, steps), lambda: {
                        "steps": steps, "tokens": steps * run.train.batch_size, **evaluate(ens, steps)})
        if rec is None:
            continue
        common.cached_json(committed_path(scale, name, steps), lambda: rec)
        records.append(rec)
    return records
