"""How ReLU's L1 coefficient and JumpReLU's initial threshold were chosen (common.OTHER_ARCHS).

Trains one short single SAE (seed 0, other_train_tokens of the scale) per setting on the scale's
cache and reports its training L0 over the last logged steps and its test L0 and explained variance.
The table 1 settings are the ones whose L0 lands near TopK's k. Writes results/sparsity_probe.{json,md}.

    python -m experiments.sparsity_probe --scale full
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from experiments import common
from saeens.config import SAEConfig
from saeens.evals import intrinsic

NAME = "sparsity_probe"
TUNED = ("l1_coeff", "l0_coeff", "jumprelu_init_threshold", "jumprelu_bandwidth")
GRID = (
    ("relu", (("l1_coeff", 5.0),)),  # saeens' default
    ("relu", (("l1_coeff", 2.0),)),
    ("relu", (("l1_coeff", 2.5),)),
    ("relu", (("l1_coeff", 3.0),)),
    ("jumprelu", (("l0_coeff", 0.75),)),  # saeens' defaults: threshold 0.001, bandwidth 0.001
    ("jumprelu", (("l0_coeff", 0.75), ("jumprelu_init_threshold", 1.0), ("jumprelu_bandwidth", 0.1))),
    ("jumprelu", (("l0_coeff", 0.75), ("jumprelu_init_threshold", 2.0), ("jumprelu_bandwidth", 0.1))),
)


def probe(scale: common.Scale, acts, arch: str, overrides: tuple, progress: bool) -> dict[str, Any]:
    from saeens.train import fit, load_ensemble

    run = common.run_config(scale, acts.d_in, arch, "single", 1, 0)
    defaults = {f.name: f.default for f in dataclasses.fields(SAEConfig) if f.name in TUNED}  # not OTHER_ARCHS'
    run = dataclasses.replace(run, sae=dataclasses.replace(run.sae, **{**defaults, **dict(overrides)}))
    tag = "-".join(f"{k}{v}" for k, v in overrides)
    rd = common.WORK / scale.name / NAME / f"{arch}-{tag}"
    if not (rd / "ensemble.json").is_file():
        fit(rd, run, acts, progress=progress)
    ens, _ = load_ensemble(rd)
    logged = [json.loads(line) for line in (rd / "metrics.jsonl").read_text().splitlines()]
    test = intrinsic.run(ens, acts, intrinsic.IntrinsicConfig(connectivity=False)).to_dict()
    return {"arch": arch, "setting": ", ".join(f"{k}={v}" for k, v in overrides),
            "l0_train_last": logged[-1]["l0"], "step_last": logged[-1]["step"], "l0_test": test["l0"],
            "explained_variance": test["explained_variance"], "in_table_1": (arch, overrides) in common.OTHER_ARCHS}


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    from saeens.tables import format_table

    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    rows = [probe(scale, acts, arch, ov, progress) for arch, ov in GRID]
    result = {"scale": scale.name, "train_tokens": scale.other_train_tokens, "k_topk": scale.k, "rows": rows}
    md = "\n".join([f"# Sparsity probe: ReLU / JumpReLU settings against TopK k = {scale.k}", "",
                    f"One single SAE of {scale.width} latents per setting, {scale.other_train_tokens} tokens, seed 0.", "",
                    f"Regenerate: `python -m experiments.sparsity_probe --scale {scale.name}`", "", format_table(rows)])
    common.write_result(scale, NAME, result, md)
    return result


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
