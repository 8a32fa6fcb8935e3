"""Figure 2: every metric against the number of members J = 1..members, bagging and boosting (TopK).

No ensemble of its own is trained for this figure. The first j members of a bagging ensemble ARE a
bagging ensemble of j members (members differ only in their keys; weights become 1/j), and the first
j stages of a boosting ensemble ARE a boosting ensemble of j stages (stage j never sees later ones).
So the first `sweep_seeds` (default: `seeds`) independent J = members ensembles of table 1 are sliced
(`ensemble.prefix`; a session that does not have them trains them again, the same runs), and the 95%
confidence bands are Student-t intervals over those independent ensembles. Stability at J = j
compares the j-prefixes of the independent ensembles. Connectivity of every prefix comes from one
co-firing matrix per ensemble (the prefix's firing matrix is its first j*m columns). The spliced
loss here uses `sweep_spliced_contexts` contexts (clean and zero-ablation computed once).
Writes results/effect_of_j.{json,md,png}.

A method's ensembles may take longer than a session (a boosting run is ~25-50 min on 2 cores), and a
new session's machine has none of them. So each finished ensemble is committed at once: its prefix
metrics in the partial result, and its decoder rows in float16 under results/effect_of_j-decoders/
(~10 MB each: stability needs every independent ensemble's rows together). A rerun trains only the
seeds not committed; the decoder files are removed once the method's curves are written. Stability is
always computed from the float16 rows (a cosine moves by < 1e-3; tests/test_experiments_gpu.py).

    python -m experiments.effect_of_j --scale full
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from experiments import common
from experiments.intrinsic import table_run
from saeens import ensemble, metrics
from saeens.evals import intrinsic

NAME = "effect_of_j"
METRICS = ("explained_variance", "explained_variance_per_token", "mse", "l0", "relative_reconstruction_bias",
           "dead_fraction", "dense_fraction", "diversity", "diversity_fraction", "connectivity", "stability",
           "delta_lm_loss", "loss_recovered")
PLOTTED = ("explained_variance", "mse", "l0", "relative_reconstruction_bias", "dead_fraction", "diversity_fraction",
           "connectivity", "stability", "delta_lm_loss", "loss_recovered")


def prefix_metrics(scale, acts, spliced: common.Spliced, ens, run_dir: Path) -> list[dict[str, Any]]:
    """Metrics of the prefixes j = 1..J of one ensemble (cached per run directory)."""
    J = ens.n_members
    js = list(range(1, J + 1))

    def compute():
        sample = acts.gather(np.arange(min(scale.connectivity_tokens, acts.n_rows("test"))), "test")
        conn = intrinsic.prefix_connectivity(ens, sample, js)
        out = []
        for j, c in zip(js, conn):
            sub = ensemble.prefix(ens, j)
            r = intrinsic.run(sub, acts, intrinsic.IntrinsicConfig(connectivity=False)).to_dict()
            r["connectivity"] = c
            r.update(spliced.fast(sub))
            out.append({"J": j, **r})
        return {"prefixes": out}

    path = run_dir / f"eval-{NAME}-{spliced.contexts.shape[0]}ctx.json"
    return common.cached_json(path, compute)["prefixes"]


def decoder_path(scale: common.Scale, method: str, seed: int) -> Path:
    """Where one finished ensemble's decoder rows wait, committed, for the method's other seeds."""
    return common.results_dir(scale) / f"{NAME}-decoders" / f"{method}-s{seed}.npy"


def committed_seeds(scale: common.Scale, method: str, result: dict[str, Any]) -> list[list[dict[str, Any]]]:
    """The prefix metrics of the seeds an earlier session finished, seed 0 on, up to the first whose
    decoder file is missing (that one and later ones train again)."""
    rows = []
    for seed, r in enumerate(result.get("runs", {}).get(method, [])[: scale.sweep_seeds or scale.seeds]):
        if not decoder_path(scale, method, seed).is_file():
            break
        rows.append(r)
    return rows


def drop_decoders(scale: common.Scale, method: str) -> None:
    """Remove a method's waiting decoder files once its curves are written (they hold nothing more)."""
    d = decoder_path(scale, method, 0).parent
    for path in d.glob(f"{method}-s*.npy"):
        path.unlink()
    if d.is_dir() and not any(d.iterdir()):
        d.rmdir()


def sweep(scale: common.Scale, acts, spliced: common.Spliced, method: str, progress: bool,
          committed: list[list[dict[str, Any]]], on_ensemble) -> tuple[dict[str, dict[str, list[float]]], list]:
    """One method's curves (each metric at J = 1..members: mean and t interval over the independent
    ensembles; stability with its chance level) and the per-run prefix metrics. `committed`: the
    `committed_seeds` of an earlier session; `on_ensemble(rows)` is called after each newly finished
    ensemble, to commit it."""
    J, n_seeds = scale.members, scale.sweep_seeds or scale.seeds
    rows = list(committed)
    for seed in range(len(rows), n_seeds):
        ens, info = table_run(scale, acts, "topk", method, seed, progress)
        rows.append(prefix_metrics(scale, acts, spliced, ens, common.run_path(info)))
        path = decoder_path(scale, method, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.asarray(ensemble.decoder(ens), np.float16))
        on_ensemble(rows)
    decs = [np.load(decoder_path(scale, method, s)).astype(np.float32) for s in range(n_seeds)]
    curves = {}
    for m in METRICS:
        c = {"x": list(range(1, J + 1)), "mean": [], "ci_low": [], "ci_high": []}
        for j in range(1, J + 1):
            if m == "stability":  # one score per independent ensemble: stability's own interval
                prefix_decs = [d.reshape(J, -1, d.shape[1])[:j].reshape(-1, d.shape[1]) for d in decs]  # first j members
                s = metrics.stability(prefix_decs)
                chance = metrics.stability_chance([d.shape[0] for d in prefix_decs], d_in=decs[0].shape[1])["stability"]
                c.setdefault("chance", []).append(chance)  # the same computation on random unit vectors
            else:
                s = metrics.mean_ci([r[j - 1][m] for r in rows])
            for key in ("mean", "ci_low", "ci_high"):
                c[key].append(s[key])
        curves[m] = c
    return curves, rows


def main(scale: common.Scale, force: bool = False, progress: bool = True) -> dict[str, Any] | None:
    """Bagging, then boosting; each finished ensemble and each method's curves are written as soon as
    they are done (a partial result, "complete": false) and read back from that result on a rerun: the
    next session's machine has none of the runs."""
    if common.result_done(scale, NAME, force):
        return None
    acts = common.get_cache(scale, progress)
    spliced = common.Spliced(scale, scale.sweep_spliced_contexts)
    done = {} if force else common.read_result(scale, NAME) or {}
    seeds = scale.sweep_seeds or scale.seeds
    result = {"scale": scale.name, "hook": common.hook(), "members": scale.members, "seeds": seeds, "k": scale.k,
              "width": scale.width, "sweep_spliced_contexts": scale.sweep_spliced_contexts,
              "curves": done.get("curves", {}), "runs": done.get("runs", {})}
    methods = ("bagging", "boosting")

    def write(method: str, rows: list) -> None:
        result["runs"][method] = rows
        result["complete"] = all(m in result["curves"] for m in methods)
        common.write_result(scale, NAME, result, markdown(result))

    for method in methods:
        if method not in result["curves"]:
            result["curves"][method], rows = sweep(scale, acts, spliced, method, progress,
                                                   committed_seeds(scale, method, result), lambda r, m=method: write(m, r))
            write(method, rows)
            plot(scale, result)
        drop_decoders(scale, method)  # also what a session cut right after the write left
    return result


def plot(scale: common.Scale, result: dict[str, Any]) -> None:
    """results/effect_of_j.png: the curves done so far (a partial result gets its plot too)."""
    from saeens.plots import curves_with_bands

    curves_with_bands(result["curves"], list(PLOTTED), common.results_dir(scale) / f"{NAME}.png",
                      xlabel="J (members / stages)",
                      title=f"{result['hook']}: TopK k={result['k']}, m={result['width']}; "
                            f"95% CI over {result['seeds']} ensembles")


def markdown(result: dict[str, Any]) -> str:
    from saeens.tables import format_table

    lines = [f"# Figure 2: the effect of J (TopK k = {result['k']}, {result['width']} latents per member)", "",
             f"Prefixes of the {result['seeds']} independent J = {result['members']} ensembles of table 1 "
             "(a bagging ensemble's first j members are a j-member bagging ensemble; a boosting ensemble's first j "
             "stages are a j-stage boosting ensemble). Mean [95% CI] over the independent ensembles. Spliced loss "
             f"over {result['sweep_spliced_contexts']} held-out contexts. Plot: effect_of_j.png.", "",
             f"Regenerate: `python -m experiments.effect_of_j --scale {result['scale']}`", ""]
    for method, by_metric in result["curves"].items():
        lines += [f"## {method}", ""]
        rows = []
        for i, j in enumerate(by_metric["explained_variance"]["x"]):
            row = {"J": j}
            for m in ("explained_variance", "mse", "l0", "relative_reconstruction_bias", "dead_fraction",
                      "diversity_fraction", "connectivity", "delta_lm_loss"):
                row[m] = by_metric[m]["mean"][i]
            s = by_metric["stability"]
            row["stability"] = common.fmt_ci(s["mean"][i], s["ci_low"][i], s["ci_high"][i])
            if "chance" in s:
                row["chance"], row["x_chance"] = s["chance"][i], metrics.over_chance(s["mean"][i], s["chance"][i])
            rows.append(row)
        lines += [format_table(rows), ""]
    for method in [m for m in result["runs"] if m not in result["curves"]]:
        lines += [f"## {method}", "", f"{len(result['runs'][method])} of {result['seeds']} ensembles done (each "
                  "committed as it lands); the curves come when all are.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    a = common.parser(__doc__).parse_args()
    main(common.SCALES[a.scale], a.force, not a.quiet)
