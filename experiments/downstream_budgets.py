"""Tables 4 and 5 at the first study's budget with today's protocol: concept detection and SCR of
the twins of table 1's seed-0 TopK runs (across_budgets.twin: the same seeds trained to the first
study's budget only; the single SAE is member 0 of bagging's twin).

The first study's tables 4 and 5 differ from the new budget's in two ways at once: the budget, and
the protocol (massive-activation rows skipped, SCR ranking latents by their absolute effect and N up
to 500). These tables hold the first study's budget and today's protocol, so what moved between the
first study and them is the protocol, and what moved between them and tables 4 and 5 is the budget.
The pooled batches are kept like table 4's and 5's (an interrupted pass resumes). Writes
<results>/concept_detection-first-budget.{json,md,png} and spurious_removal-first-budget.{json,md,png}.

    python -m experiments.downstream_budgets --scale full
"""

from __future__ import annotations

from typing import Any

from experiments import common, concept_detection, downstream, spurious_removal

NAMES = tuple(downstream.result_name(n, True) for n in (concept_detection.NAME, spurious_removal.NAME))


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    if not scale.budgets_of("topk"):
        print(f"scale {scale.name} has no budget below table 1's: nothing to compare, skipped")
        return None
    return {"concept_detection": concept_detection.main(scale, force, progress, first_budget=True),
            "spurious_removal": spurious_removal.main(scale, force, progress, first_budget=True)}


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
