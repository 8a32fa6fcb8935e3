"""Why other runs do not reproduce boosting's later stages: a cascade from stage 1, or a residual
whose dictionary is not identifiable?

Table 1's stability per stage (saeens.metrics.stability_per_member) finds stage 1 as stable as a
single SAE and the later stages near chance, at the first study's budget and at 10x it. Two causes
fit that. Cascade: stage 1 differs between runs, so each run's stage 2 fits another residual.
Identifiability: the residual that stage 1 leaves admits many equally good dictionaries, so even
one residual gives other features from other seeds. Per budget, R = `seeds` single SAEs with the
seeds 0..R-1 train on ONE stage 1's residual (seed 0's boosting run at that budget) and are compared
with each other, beside the same comparison on the raw activations:
- at the first study's budget (boosting's twins, experiments/across_budgets.py), against the twins'
  stage 1 and their stage 2, each on its own stage 1's residual: the SAEs on one residual differ
  from the independent stage 2s only in sharing stage 1;
- at table 1's budget, against table 1's single row (the same seeds, budget and counts on the raw
  activations); stage 1 is that of table 1's boosting run of seed 0, which probing and SCR reuse.
Each stability is beside its chance level (random unit vectors of the same counts). An SAE on the
residual normalises it to its own input scale (boosting's stage 2 shares stage 1's); with Adam and
TopK's scale-equivariant codes that changes only the scale of the loss.

    python -m experiments.boosting_stages --scale full     # after table 1 and across_budgets
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.across_budgets import boosting_runs
from saeens import ensemble
from saeens.data.source import CacheSource

NAME = "boosting_stages"
ARCH = "topk"


class StageResidual:
    """A cache's training rows minus a frozen SAE's reconstruction: what boosting's next stage trains
    on (a BatchSource; saeens/data/source.py)."""

    def __init__(self, acts, stage, describe_as: str):
        self.base, self.label = CacheSource(acts), describe_as
        self.d_in = self.base.d_in
        self._residual = jax.jit(lambda x_BD: x_BD - ensemble.reconstruct(stage, x_BD))

    def describe(self) -> dict[str, Any]:
        return {**self.base.describe(), "residual_of": self.label}

    def n_rows(self, split: str = "train") -> int:
        return self.base.n_train if split == "train" else 0

    def init_sample(self, n: int, seed: int) -> np.ndarray:
        return self.residual(self.base.init_sample(n, seed))

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
        return self.residual(self.base.batch(step, batch_size, seed, rows))

    def residual(self, x_ND: np.ndarray) -> np.ndarray:
        return np.asarray(self._residual(jnp.asarray(x_ND)))


def residual_runs(scale: common.Scale, d_in: int, tokens: int) -> list[tuple[str, Any]]:
    """(name, run) of the R single SAEs on seed 0's stage-1 residual at this budget per SAE."""
    return [(f"{common.run_name(ARCH, 'single', 1, s, scale.k)}-T{tokens}-on-stage1-of-boosting-J{scale.members}-s0",
             common.with_tokens(common.run_config(scale, d_in, ARCH, "single", 1, s), tokens)) for s in range(scale.seeds)]


def budgets(scale: common.Scale, d_in: int) -> list[int]:
    """Tokens per SAE / stage of the budgets compared: the first study's (where boosting has twins)
    and table 1's."""
    return [run.train.n_tokens for _, run in boosting_runs(scale, d_in, ARCH, 0)]


def all_residual_runs(scale: common.Scale, d_in: int, skip_committed: bool = False) -> list[tuple[str, Any]]:
    """Every run this script trains of its own (run_all's estimate); skip_committed: only those of
    budgets whose rows are not committed yet (run_all's remaining)."""
    done = committed_budgets(scale) if skip_committed else {}
    return [r for tokens in budgets(scale, d_in) if tokens not in done for r in residual_runs(scale, d_in, tokens)]


def committed_budgets(scale: common.Scale) -> dict[int, dict[str, Any]]:
    """The budgets a partial result already holds (tokens -> its rows and reading): a session whose
    machine lost the runs reads them back instead of training them again."""
    return {b["tokens"]: b for b in (common.read_result(scale, NAME) or {}).get("budgets", [])}


def stage_decoder(ens, j: int) -> np.ndarray:
    """Stage j's decoder rows [m, d] of a boosting ensemble."""
    return np.asarray(ensemble.member(ens, j)["W_dec"])


def row(what: str, decoders: list[np.ndarray]) -> dict[str, Any]:
    """Stability of these R decoders (each against the others) beside its chance level: table 1's
    stability columns (experiments/intrinsic.py)."""
    from experiments.intrinsic import stability_of

    return {"what": what, "runs": len(decoders), **stability_of(decoders)}


def on_residual(scale: common.Scale, acts, boost, info: dict[str, Any], tokens: int, progress: bool) -> dict[str, Any]:
    """The row of the R single SAEs trained on `boost`'s stage-1 residual at this budget."""
    source = StageResidual(acts, ensemble.single(boost.cfg, ensemble.member(boost, 0)), f"stage 1 of {info['run_dir']}")
    decoders = [np.asarray(ensemble.decoder(common.ensure_run(scale, name, run, source, progress)[0]))
                for name, run in residual_runs(scale, acts.d_in, tokens)]
    return row(f"single SAEs on one stage 1's residual (seeds 0-{len(decoders) - 1})", decoders)


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    from experiments.intrinsic import table_run

    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    compared = budgets(scale, acts.d_in)  # one budget where boosting has no twins
    first, last = compared[0], compared[-1]
    done = {} if force else committed_budgets(scale)
    result = {"scale": scale.name, "arch": ARCH, "k": scale.k, "width": scale.width, "seeds": scale.seeds,
              "batch_size": scale.batch_size, "budgets": [done[first]] if first in done and first != last else [],
              "complete": False}
    if first != last and first not in done:  # the first study's budget: boosting's twins, stage 1 and stage 2
        twins = [common.ensure_run(scale, *boosting_runs(scale, acts.d_in, ARCH, s)[0], acts, progress)
                 for s in range(scale.seeds)]
        rows = [row("stage 1 of independent boosting runs", [stage_decoder(e, 0) for e, _ in twins]),
                row("stage 2 of independent boosting runs (each on its own stage 1's residual)",
                    [stage_decoder(e, 1) for e, _ in twins]),
                on_residual(scale, acts, *twins[0], first, progress)]
        result["budgets"].append({"tokens": first, "rows": rows, "reading": reading(rows[0], rows[1], rows[2])})
        common.write_result(scale, NAME, result, markdown(result))  # a rerun trains only the rest
    single = next(r for r in common.read_result(scale, "intrinsic")["rows"]
                  if r["arch"] == ARCH and r["method"] == "single")
    rows = [{"what": f"single SAEs on the activations (table 1's single row, seeds 0-{single['runs'] - 1})",
             "runs": single["runs"], **{k: single[k] for k in ("stability", "stability_ci_low", "stability_ci_high",
                                                               "stability_scores", "stability_chance",
                                                               "stability_over_chance")}},
            on_residual(scale, acts, *table_run(scale, acts, ARCH, "boosting", 0, progress), last, progress)]
    result["budgets"].append({"tokens": last, "rows": rows, "reading": reading(rows[0], None, rows[1])})
    result["complete"] = True
    common.write_result(scale, NAME, result, markdown(result))
    return result


def reading(raw: dict[str, Any], independent: dict[str, Any] | None, shared: dict[str, Any]) -> str:
    """Which cause the numbers point to, in multiples of chance: the SAEs on one residual against
    those on the raw activations (stage 1) and, where measured, against independent stage 2s."""
    x_raw, x_shared = raw["stability_over_chance"], shared["stability_over_chance"]
    if x_raw < 1.5:  # nothing reproducible on the activations either: too few steps to tell anything
        return (f"no reading: single SAEs on the activations agree only {x_raw:.2f}x chance at this budget "
                f"(on one stage-1 residual: {x_shared:.2f}x)")
    if independent is None:
        return (f"SAEs on one stage-1 residual agree {x_shared:.2f}x chance, single SAEs on the activations "
                f"{x_raw:.2f}x: " + ("the residual's dictionary stays far less identifiable at this budget"
                                     if x_shared - 1 < 0.5 * (x_raw - 1) else
                                     "at this budget the residual's dictionary is about as identifiable as the activations'"))
    x_ind = independent["stability_over_chance"]
    if x_shared - x_ind < 0.5 * (x_raw - x_ind):
        return (f"identifiability: SAEs on ONE stage-1 residual agree {x_shared:.2f}x chance, about as little as "
                f"independent stage 2s ({x_ind:.2f}x; stage 1: {x_raw:.2f}x), so the residual itself admits "
                "many dictionaries and sharing stage 1 does not make stage 2 reproducible")
    return (f"cascade: SAEs on ONE stage-1 residual agree {x_shared:.2f}x chance against {x_ind:.2f}x for "
            f"independent stage 2s (stage 1: {x_raw:.2f}x), so most of stage 2's instability comes from the "
            "runs' different stage 1s")


def finding_lines(result: dict[str, Any]) -> list[str]:
    """The report's lines: per budget, each row's stability over chance, and the reading."""
    return [f"- **Why boosting's later stages are not reproduced, {b['tokens']:,} tokens per SAE / stage** "
            f"({result['seeds']} runs per row): " + "; ".join(
                f"{r['what']} {common.fmt_ci(r['stability'], r['stability_ci_low'], r['stability_ci_high'])} "
                f"({r['stability_over_chance']:.2f}x chance)" for r in b["rows"]) + f". Reading: {b['reading']}."
            for b in result["budgets"]]


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import format_table

    lines = ["# Why other runs do not reproduce boosting's later stages", "",
             f"TopK k = {result['k']}, m = {result['width']}, batch {result['batch_size']}, {result['seeds']} runs per "
             "row; stability mean [95% t] beside its chance level (random unit vectors of the same counts).", "",
             f"Regenerate: `python -m experiments.boosting_stages --scale {result['scale']}`", ""]
    if not result.get("complete", True):
        lines += ["**Partial**: the budgets finished so far; a rerun trains the rest.", ""]
    for b in result["budgets"]:
        table = [{"compared": r["what"], "runs": r["runs"],
                  "stability": common.fmt_ci(r["stability"], r["stability_ci_low"], r["stability_ci_high"]),
                  "chance": r["stability_chance"], "x_chance": r["stability_over_chance"]} for r in b["rows"]]
        lines += [f"## {b['tokens']:,} tokens ({b['tokens'] // result['batch_size']} steps) per SAE / stage", "",
                  format_table(table), "", f"Reading: {b['reading']}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
