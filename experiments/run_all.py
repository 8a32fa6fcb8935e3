"""Every experiment in order, resumably: cache -> sparsity probe -> table 1 -> J sweep -> Pareto -> probing -> SCR -> report.

    python -m experiments.run_all --scale full        # the study (see README for the budget)
    python -m experiments.run_all --scale tiny        # the code path in a few minutes
    python -m experiments.run_all --scale full --estimate   # training FLOPs per script, nothing run

Interrupt it at any point and run the same command again: the cache continues after its last shard,
training runs resume from their last checkpoint (experiments/work/<scale>/runs/), evaluations already
done are read back (eval-*.json in each run directory), and finished results are skipped. One
process: the model is loaded once. Wall times per script accumulate in <results>/timings.json.
"""

from __future__ import annotations

import json
import time

from experiments import (common, concept_detection, effect_of_j, intrinsic, pareto, report, sparsity_probe,
                         spurious_removal)

STEPS = (("sparsity_probe", sparsity_probe.main), ("intrinsic", intrinsic.main), ("effect_of_j", effect_of_j.main),
         ("pareto", pareto.main), ("concept_detection", concept_detection.main),
         ("spurious_removal", spurious_removal.main), ("report", report.main))


def estimate(scale: common.Scale, d_in: int = 576) -> dict[str, float]:
    """Training FLOPs (dense FLOP model of common.py) that each script adds, in TFLOP."""
    fl = lambda arch, method, J, seed, k=None: common.train_flops(  # noqa: E731
        common.run_config(scale, d_in, arch, method, 1 if method == "single" else J, seed, k))
    t1 = sum(fl("topk", m, scale.members, s) for m in common.METHODS for s in range(scale.seeds))
    t1 += sum(fl(a, m, scale.members, s) for a, _ in scale.other_archs for m in common.METHODS
              for s in range(scale.other_seeds))
    pa = sum(fl("topk", m, scale.pareto_members, 0, k) for k in scale.pareto_ks for m in common.METHODS
             if not (k == scale.k and m != "expanded"))
    probe = len(sparsity_probe.GRID) * fl("relu", "single", 1, 0)
    return {"sparsity_probe": probe / 1e12, "intrinsic": t1 / 1e12, "effect_of_j": 0.0, "pareto": pa / 1e12, "concept_detection": 0.0,
            "spurious_removal": 0.0}


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> None:
    from saeens.io.files import atomic_write_text

    timings_path = common.results_dir(scale) / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
    t0 = time.perf_counter()
    common.get_cache(scale, progress)
    timings["cache"] = common.cache_seconds(scale)
    for name, fn in STEPS:
        print(f"== {name} ({scale.name})", flush=True)
        t = time.perf_counter()
        fn(scale, force, progress)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        atomic_write_text(timings_path, json.dumps(timings, indent=2))
    print(f"all done in {time.perf_counter() - t0:.0f} s this session; per-script wall times in {timings_path}")


if __name__ == "__main__":
    ap = common.parser(__doc__)
    ap.add_argument("--estimate", action="store_true", help="print training TFLOP per script and exit")
    a = ap.parse_args()
    sc = common.SCALES[a.scale]
    if a.estimate:
        print(json.dumps(estimate(sc), indent=2))
    else:
        main(sc, a.force, not a.quiet)
