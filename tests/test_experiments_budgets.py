"""The study's protocol pieces without the model: evaluations at intermediate budgets equal runs of
that many steps, the work directory moves with SAEENS_WORK, the noise rule of experiments/uncertainty.py,
and the planned-hours estimate."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import budgets, common, estimate, uncertainty
from saeens import ensemble
from saeens.data.cache import ArrayActivations

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "WORK", tmp_path / "work")
    return tmp_path / "work"


def _scale(**kw):
    return dataclasses.replace(common.SCALES["tiny"], batch_size=64, checkpoint_every=4, dead_tokens=512, **kw)


def test_a_budget_evaluation_is_the_run_of_that_many_steps(work):
    """Constant lr, fixed batch and dead_tokens: stopping the long run at S steps gives the ensemble
    an S-step run trains (so intermediate budgets cost no training of their own)."""
    from saeens.train import fit

    scale = _scale()
    acts = ArrayActivations(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32), 0.1)
    run = common.run_config(scale, 8, "topk", "bagging", 2, 0)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, n_tokens=64 * 20))
    assert budgets.budget_steps(run, (64 * 8, 64 * 9, 10**9)) == [8, 20]  # rounded to whole checkpoints
    seen = {}

    def evaluate(ens, steps):
        seen[steps] = np.asarray(ensemble.decoder(ens))
        return {"fvu": float(steps)}

    recs = budgets.train_with_budgets(scale, "r", run, acts, (64 * 8,), evaluate, progress=False)
    assert [(r["steps"], r["tokens"]) for r in recs] == [(8, 512), (20, 1280)]
    short = dataclasses.replace(run, train=dataclasses.replace(run.train, n_tokens=64 * 8))
    alone = np.asarray(ensemble.decoder(fit(work / "alone", short, acts, progress=False)))
    np.testing.assert_allclose(seen[8], alone, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (work / "tiny-results" / "budgets").iterdir()) == ["r-20.json", "r-8.json"]
    seen.clear()  # a rerun reads every evaluation back: nothing is trained or evaluated again
    assert budgets.train_with_budgets(scale, "r", run, acts, (64 * 8,), evaluate, progress=False) == recs and not seen


def test_a_boosting_budget_is_its_stage_length_and_every_stage_trains(work):
    """Boosting has no points on the way (each stage trains its own budget): train_with_budgets
    trains all J stages, records one stage's steps and tokens, and refuses intermediate budgets."""
    from saeens.train import fit

    scale = _scale()
    acts = ArrayActivations(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32), 0.1)
    run = common.run_config(scale, 8, "topk", "boosting", 2, 0)
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, n_tokens=64 * 8))
    with pytest.raises(ValueError, match="one boosting run per budget"):
        budgets.train_with_budgets(scale, "b", run, acts, (64 * 4,), lambda e, s: {}, progress=False)
    seen = {}

    def evaluate(ens, steps):
        seen[steps] = np.asarray(ensemble.decoder(ens))
        return {}

    recs = budgets.train_with_budgets(scale, "b", run, acts, (), evaluate, progress=False)
    assert [(r["steps"], r["tokens"]) for r in recs] == [(8, 512)]
    alone = np.asarray(ensemble.decoder(fit(work / "alone", run, acts, progress=False)))
    np.testing.assert_allclose(seen[8], alone, rtol=1e-6, atol=1e-6)  # stage 1 trained too, not left at its init


def test_the_work_directory_follows_saeens_work(tmp_path):
    code = "from experiments import common; print(common.WORK); print(common.results_dir(common.SCALES['tiny']))"
    env = {**os.environ, "SAEENS_WORK": str(tmp_path / "elsewhere")}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(tmp_path / "elsewhere"), str(tmp_path / "elsewhere" / "tiny-results")]


def test_a_flip_inside_the_noise_is_no_difference():
    a, b = {"mean": 0.50, "ci_low": 0.45, "ci_high": 0.55}, {"mean": 0.52, "ci_low": 0.48, "ci_high": 0.56}
    assert uncertainty.compare(a, b) == uncertainty.NO_DIFFERENCE
    c = {"mean": 0.70, "ci_low": 0.66, "ci_high": 0.74}
    assert uncertainty.compare(c, a) == "higher" and uncertainty.compare(a, c) == "lower"
    assert uncertainty.compare(c, {"mean": 0.1, "ci_low": float("nan"), "ci_high": float("nan")}) == uncertainty.NO_DIFFERENCE
    assert uncertainty.best_of({"x": a, "y": b, "z": c}) == "z" and uncertainty.best_of({"x": a, "y": b}) == "no difference"
    assert uncertainty.best_of({"x": a, "z": c}, higher_is_better=False) == "x"
    assert uncertainty.change("higher", "lower") == "flips" and uncertainty.change("higher", "no difference") == "vanishes"
    assert uncertainty.change("no difference", "no difference") == "none"


def test_remaining_plans_only_what_is_neither_committed_nor_trained(work):
    """The resumed study's estimate: a committed row, a finished run in the work directory and a
    complete result cost nothing; a run that a later part needs again is paid once, where it is first needed."""
    from experiments import across_budgets, intrinsic, pareto, run_all

    scale = _scale(budgets=(1024,), other_budgets=(1024,))
    tf = lambda name, run: common.train_flops(run, scale.cache_tokens) / 1e12  # noqa: E731
    table = lambda m, s: intrinsic.row_run(scale, 16, "topk", m, s)  # noqa: E731
    full, left = run_all.estimate(scale, d_in=16), run_all.remaining(scale, d_in=16)
    for part in ("sparsity_probe", "data_policy", "convergence", "intrinsic", "across_budgets", "pareto"):
        assert left[part] == pytest.approx(full[part])  # nothing committed: the whole plan
    assert left["concept_detection"] == left["spurious_removal"] == left["effect_of_j"] == {}  # table 1's runs
    own = dict(pareto.point_run(scale, 16, m, k) for k in (4, 8) for m in common.METHODS
               if not pareto.from_table(scale, m, k))
    assert len(own) == 4 and left["pareto"]["topk"] == pytest.approx(sum(tf(*r) for r in own.items()))
    # probing and SCR at the first budget: the seed-0 twins of bagging and the expanded SAE (boosting's
    # twin is paid by across_budgets, the first part to train it)
    twin = lambda m: across_budgets.twin(scale, 16, "topk", m, 0)  # noqa: E731
    assert left["downstream_budgets"]["topk"] == pytest.approx(tf(*twin("expanded")) + tf(*twin("bagging")))
    assert left["downstream_budgets"] == pytest.approx(full["downstream_budgets"])
    # table 1's TopK expanded row is committed: its runs are paid by probing, the first part to need them again
    for s in range(2):
        path = intrinsic.run_record_path(scale, intrinsic.run_dir_of(scale, "topk", "expanded", s))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    stab = intrinsic.vectors_prefix(scale, "topk", "expanded").with_suffix(".json")
    stab.parent.mkdir(parents=True)
    stab.write_text("{}")
    left = run_all.remaining(scale, d_in=16)
    expanded = sum(tf(*table("expanded", s)) for s in range(2))
    assert left["intrinsic"]["topk"] == pytest.approx(full["intrinsic"]["topk"] - expanded)
    assert left["concept_detection"]["topk"] == pytest.approx(tf(*table("expanded", 0)))
    # ... unless the work directory holds that run finished; a complete result costs nothing
    (common.runs_dir(scale) / table("expanded", 0)[0]).mkdir(parents=True)
    (common.runs_dir(scale) / table("expanded", 0)[0] / "ensemble.json").write_text("{}")
    (common.results_dir(scale) / "convergence.json").write_text("{}")
    left = run_all.remaining(scale, d_in=16)
    assert left["concept_detection"] == {} and left["convergence"] == {}
    assert left["data_policy"] == pytest.approx(full["data_policy"])


def test_bootstrap_over_documents():
    correct = np.r_[np.ones(80), np.zeros(20)]
    ci = uncertainty.bootstrap_ci(correct)
    assert ci["mean"] == pytest.approx(0.8) and 0.70 < ci["ci_low"] < 0.8 < ci["ci_high"] < 0.9
    assert uncertainty.bootstrap_ci(correct) == ci  # seeded
    d = uncertainty.paired_accuracy_ci([correct], [correct])
    assert d["mean"] == 0.0 and d["ci_low"] == d["ci_high"] == 0.0


def test_a_paired_interval_separates_two_methods_whose_own_intervals_overlap():
    """Two probes right on mostly the same documents: each accuracy's own interval overlaps the
    other's, the paired difference (documents resampled together) clears zero; it equals a
    straightforward NumPy reference with the same seed, datasets weighing the same."""
    rng = np.random.default_rng(1)
    a = [rng.random(n) < 0.75 for n in (200, 150, 100)]
    b = [x & (rng.random(x.size) > 0.08) for x in a]  # b is right only where a is, a little less often
    groups = ["d1", "d1", "d2"]
    separate = [uncertainty.accuracy_ci([(x.mean(), x.size) for x in v], groups=groups) for v in (a, b)]
    assert uncertainty.compare(*separate) == uncertainty.NO_DIFFERENCE
    d = uncertainty.paired_accuracy_ci(a, b, n_boot=300, groups=groups)
    assert uncertainty.compare(d, uncertainty.ZERO) == "higher"
    assert uncertainty.compare(uncertainty.paired_accuracy_ci(b, a, groups=groups), uncertainty.ZERO) == "lower"
    diff = [x.astype(float) - y for x, y in zip(a, b)]
    r = np.random.default_rng(0)
    boots = []
    for _ in range(300):
        m = [v[r.integers(0, v.size, v.size)].mean() for v in diff]
        boots.append((np.mean(m[:2]) + m[2]) / 2)
    assert d["mean"] == pytest.approx((np.mean([v.mean() for v in diff[:2]]) + diff[2].mean()) / 2)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((np.percentile(boots, 2.5), np.percentile(boots, 97.5)))
    with pytest.raises(ValueError, match="same documents"):
        uncertainty.paired_accuracy_ci([a[0]], [b[1]])


def test_estimate_prints_planned_hours_from_measured_throughput(work, capsys):
    from experiments import run_all

    scale = common.SCALES["tiny"]
    rates = estimate.measure(scale, d_in=16, steps=1)
    assert set(rates) == {"topk", "dense"} and all(r > 0 for r in rates.values())
    parts = run_all.estimate(scale, d_in=16)
    assert set(parts) == {"sparsity_probe", "data_policy", "convergence", "intrinsic", "across_budgets", "pareto",
                          "boosting_stages", "downstream_budgets"}
    planned = estimate.plan(parts, rates)
    want = sum(t * 1e12 / rates[k] for kinds in parts.values() for k, t in kinds.items()) / 3600
    assert planned["total_hours"] == pytest.approx(want, abs=0.01)
    full = run_all.estimate(common.SCALES["full"])
    # single costs nothing of its own (bagging's member 0), and the study is >= 10x the old budget
    assert full["intrinsic"]["topk"] == pytest.approx(sum(
        common.train_flops(common.run_config(common.SCALES["full"], 576, "topk", m, 8, s), 2_000_000) / 1e12
        for m in ("expanded", "bagging", "boosting") for s in range(4)))
    # boosting's residual passes: stage j's forward over the rows stages j..7 read, at most the cache's rows
    boost = common.run_config(common.SCALES["full"], 576, "topk", "boosting", 8, 0)
    bag = common.train_flops(dataclasses.replace(boost, ensemble=dataclasses.replace(boost.ensemble, method="bagging")))
    assert common.train_flops(boost, 2_000_000) - bag == pytest.approx(4 * 576 * 1152 * 7 * 2_000_000)
    assert common.train_flops(boost) - bag == pytest.approx(4 * 576 * 1152 * 2929 * 1024 * 28)
    # boosting's twins at the old budget: 300 steps per stage (the other methods' point there), 4 TopK seeds
    twin = common.run_config(common.SCALES["full"], 576, "topk", "boosting", 8, 0)
    twin = dataclasses.replace(twin, train=dataclasses.replace(twin.train, n_tokens=300 * 1024))
    assert full["across_budgets"]["topk"] == pytest.approx(4 * common.train_flops(twin, 2_000_000) / 1e12)
    # probing and SCR at the old budget: the seed-0 twins of bagging and the expanded SAE (300 steps)
    assert full["downstream_budgets"]["topk"] == pytest.approx(sum(common.train_flops(dataclasses.replace(
        twin, train=dataclasses.replace(twin.train, seed=0), ensemble=dataclasses.replace(twin.ensemble, method=m)),
        2_000_000) for m in ("expanded", "bagging")) / 1e12)
    # boosting_stages: 4 single SAEs on one stage-1 residual at the twins' budget, and 4 at table 1's
    one = common.run_config(common.SCALES["full"], 576, "topk", "single", 1, 0)
    assert full["boosting_stages"]["topk"] == pytest.approx(4 * sum(common.train_flops(
        common.with_tokens(one, t), 2_000_000) for t in (300 * 1024, one.train.n_tokens)) / 1e12)
    assert common.SCALES["full"].train_tokens >= 3_000_000 and common.SCALES["full"].other_train_tokens >= 1_500_000
    assert common.SCALES["gpu"].train_tokens >= 30_000_000
    assert json.dumps(planned)


def test_report_calls_an_scr_lead_inside_the_bootstrap_noise_no_difference():
    from experiments import report

    def method(score, ci):
        return {"ablations": [{"n_ablated": 5, "score": score}], "random_ablations": [{"n_ablated": 5, "score": 0.0}],
                "scr_ci_top_5": ci}

    scr = {"dataset": "d", "methods": {"single": method(0.31, [0.20, 0.40]), "bagging": method(0.25, [0.15, 0.35])}}
    assert "no difference" in report.downstream_findings(None, scr)[0]
    scr["methods"]["bagging"] = method(0.05, [0.0, 0.1])
    assert "Best: **single**" in report.downstream_findings(None, scr)[0]


def test_report_calls_a_probing_lead_inside_the_bootstrap_noise_no_difference():
    """The concept-detection finding judges the mean top-1 accuracy over datasets by its bootstrap over
    test documents: a lead inside the noise is no difference; a partial result says so."""
    from experiments import report

    def method(acc, n):
        task = {"sae_test_accuracy": {"1": acc, "5": acc}, "n_test": n}
        return {"tasks": [task, task], "sae_top_1_test_accuracy": acc, "sae_top_5_test_accuracy": acc}

    cd = {"datasets": {"d1": {"methods": {"single": method(0.80, 40), "bagging": method(0.78, 40)}}}}
    line = report.downstream_findings(cd, None)[0]
    assert "Highest top-1: single, but no difference" in line and "partial" not in line
    cd["datasets"]["d1"]["methods"]["bagging"] = method(0.50, 400)
    cd["datasets"]["d1"]["methods"]["single"] = method(0.90, 400)
    cd["complete"] = False
    line = report.downstream_findings(cd, None)[0]
    assert "Best top-1: **single**" in line and "here d1; partial" in line


def test_report_reads_a_tie_in_one_definition_of_ev_as_no_contradiction():
    """Per-dimension EV's intervals overlap while per-token EV and MSE both single out boosting: the
    verdict is 'no method ahead', and the definitions do not disagree; a real split says they do."""
    from experiments import report

    def ci(mean, half):
        return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half}

    def rows(ev_tok_boost):
        return [{"arch": "relu", "method": m, "explained_variance": ci(ev, 0.05),
                 "explained_variance_per_token": ci(tok, 0.001), "mse": ci(mse, 1.0), "train_flops": {"mean": 1.0},
                 "train_seconds": {"mean": 1.0}, "dead_fraction": {"mean": 0.0}, "delta_lm_loss": {"mean": 0.1},
                 "diversity_fraction": {"mean": 0.5 if m == "bagging" else 1.0}, "n_features": 8 if m == "single" else 64}
                for m, ev, tok, mse in (("single", 0.55, 0.70, 40.0), ("expanded", 0.60, 0.75, 35.0),
                                        ("bagging", 0.57, 0.72, 37.0), ("boosting", 0.62, ev_tok_boost, 30.0))]

    line = report.intrinsic_findings({"setting": {"scale": {"members": 8}}, "rows": rows(0.80), "runs": {}})[0]
    assert "Best: **no difference** -> no method is ahead beyond the noise (95% CIs overlap)." in line
    assert "pick boosting" in line and "DISAGREE" not in line
    line = report.intrinsic_findings({"setting": {"scale": {"members": 8}}, "rows": rows(0.74), "runs": {}})[0]
    assert "Per-token EV (SAELens) best: expanded; lowest MSE: boosting" in line and "DISAGREE" in line
    redundancy = next(x for x in report.intrinsic_findings({"setting": {"scale": {"members": 8}}, "rows": rows(0.74),
                                                            "runs": {}}) if "Redundancy" in x)
    assert "bagging 0.500" in redundancy and "32 have no near-copy among its 8 members (the expanded SAE: 64 of 64)" in redundancy
    partial = report.intrinsic_findings({"setting": {"scale": {"members": 8}}, "rows": rows(0.74)[:1], "runs": {}})
    assert partial == ["- **relu**: rows still training (done: single)."]  # no verdict from one row


def test_report_traces_boosting_stability_to_its_stages():
    """Stage 1 as stable as the single SAE and the later stages near chance: the line says the
    ensemble's low stability is the later stages'; a stage 1 below the single SAE's interval, or late
    stages well above chance, gets the numbers without that conclusion."""
    from experiments import report

    def rows(per_stage):
        return {"single": {"stability": 0.64, "stability_ci_low": 0.63, "stability_ci_high": 0.65, "stability_chance": 0.15},
                "boosting": {"stability": float(np.mean(per_stage)), "stability_chance": 0.17,
                             "stability_per_member": per_stage}}

    runs = [{"l0_per_member": [20.0, 8.0, 2.0, 2.0], "dead_fraction_per_member": [0.0, 0.0, 0.1, 0.2]}] * 2
    line = report.stages_line("topk", rows([0.645, 0.25, 0.18, 0.175]), runs)
    assert line.startswith("- **Boosting's stages, topk** (the paper reports the ensemble only). L0 per stage")
    assert "the last 2 stages fire 12% of the ensemble's L0 (an even split: 50%)" in line
    assert "stability of each stage's features: 0.645 / 0.25 / 0.18 / 0.175 (chance 0.170 for each)" in line
    assert "the last 2 stages 1.04x chance on average: the other runs reproduce stage 1" in line
    assert "is its later stages'" not in report.stages_line("topk", rows([0.5, 0.25, 0.18, 0.175]), runs)
    assert "is its later stages'" not in report.stages_line("topk", rows([0.645, 0.5, 0.4, 0.4]), runs)
    assert report.stages_line("topk", rows([0.645, 0.25, 0.18, 0.175]), []).startswith(
        "- **Boosting's stages, topk** (the paper reports the ensemble only). Stability of each stage's")
    assert report.stages_line("topk", {"single": {}, "boosting": {}}, []) == ""


def test_report_shows_the_first_studys_result_labelled_until_the_new_one_lands(tmp_path, monkeypatch):
    """A part of the long-budget study that has not run yet shows the first study's result (from
    results/first-study/) with a note; a part the first study lacked says 'not run yet'; a part that
    has run shows its own, without the note."""
    from experiments import report

    monkeypatch.setattr(common, "ROOT", tmp_path / "experiments")
    scale = common.SCALES["full"]
    first = common.results_dir(scale) / report.FIRST_STUDY
    first.mkdir(parents=True)
    (first / "intrinsic.json").write_text(json.dumps({"setting": {"scale": {"train_tokens": 300000}}}))
    (first / "pareto.json").write_text(json.dumps({"which": "first"}))
    data, where, note = report.load_or_first(scale, "pareto")
    assert data == {"which": "first"} and where == "experiments/results/first-study"
    assert note.startswith(" (the first study's: 300,000 tokens per SAE, massive-activation rows kept;")
    assert report.not_run(scale, "pareto") == ("- not run yet at this budget; the first study's: "
                                               "`experiments/results/first-study/findings.md`")
    assert report.load_or_first(scale, "boosting_stages") == (None, "", "")
    assert report.not_run(scale, "boosting_stages") == "- not run yet"
    (common.results_dir(scale) / "pareto.json").write_text(json.dumps({"which": "new"}))
    assert report.load_or_first(scale, "pareto") == ({"which": "new"}, "experiments/results", "")


def test_boosting_stages_reads_a_cause_only_where_stage_1_is_reproducible():
    from experiments.boosting_stages import reading

    x = lambda v: {"stability_over_chance": v}  # noqa: E731
    assert reading(x(2.77), x(1.47), x(1.51)).startswith("identifiability: ")
    assert reading(x(2.77), x(1.47), x(2.5)).startswith("cascade: ")
    assert reading(x(4.35), None, x(1.6)).endswith("the residual's dictionary stays far less identifiable at this budget")
    assert reading(x(4.35), None, x(4.0)).endswith("about as identifiable as the activations'")
    assert reading(x(1.14), None, x(1.09)).startswith("no reading: ")  # both near chance (too few steps)
    assert reading(x(1.14), x(1.0), x(1.09)).startswith("no reading: ")


def test_probing_accuracy_interval_over_test_documents():
    ci = uncertainty.accuracy_ci([(0.8, 100), (0.6, 50)])
    assert ci["mean"] == pytest.approx(0.7) and ci["ci_low"] < 0.7 < ci["ci_high"]
    wide, narrow = uncertainty.accuracy_ci([(0.8, 20)]), uncertainty.accuracy_ci([(0.8, 2000)])
    assert wide["ci_high"] - wide["ci_low"] > 4 * (narrow["ci_high"] - narrow["ci_low"])  # fewer documents, more noise


def test_probing_accuracy_over_datasets_weighs_each_dataset_the_same():
    """accuracy_ci(groups=): the mean over datasets of each dataset's mean over its tasks, its interval
    the same bootstrap of every task's documents (a straightforward NumPy reference, same seed)."""
    tasks, groups = [(0.9, 40), (0.7, 60), (0.5, 30)], ["a", "a", "b"]
    got = uncertainty.accuracy_ci(tasks, n_boot=300, groups=groups)
    assert got["mean"] == pytest.approx((0.8 + 0.5) / 2)
    rng = np.random.default_rng(0)
    docs = [np.r_[np.ones(round(a * n)), np.zeros(n - round(a * n))] for a, n in tasks]
    boots = []
    for _ in range(300):
        acc = [d[rng.integers(0, d.size, d.size)].mean() for d in docs]
        boots.append((np.mean(acc[:2]) + acc[2]) / 2)
    assert (got["ci_low"], got["ci_high"]) == pytest.approx((np.percentile(boots, 2.5), np.percentile(boots, 97.5)))
    flat = uncertainty.accuracy_ci(tasks, n_boot=300)  # no groups: every task weighs the same
    assert flat["mean"] == pytest.approx(0.7)


def test_convergence_writes_each_finished_curve_and_a_rerun_finishes_it(work, monkeypatch):
    """A session that ends mid-study leaves the curves finished so far, marked incomplete; the same
    command then finishes the result instead of skipping it."""
    from experiments import convergence

    fake = lambda: {"steps": [4], "tokens": [256], "stability_chance": [0.1], "ev_drivers_seed0": [[]],  # noqa: E731
                    **{m: {"mean": [0.5], "ci_low": [0.4], "ci_high": [0.6]} for m in convergence.CURVE_METRICS}}
    calls = []

    def curve(scale, acts, spliced, method, *args):
        calls.append(method)
        if method == "expanded" and calls.count("expanded") == 1:
            raise KeyboardInterrupt  # the session ends while the expanded SAE trains
        return fake()

    monkeypatch.setattr(common, "get_cache", lambda scale, progress=True: None)
    monkeypatch.setattr(common, "Spliced", lambda scale, n: None)
    monkeypatch.setattr(common, "hook", lambda: "toy")
    monkeypatch.setattr(convergence, "curve", curve)
    scale = common.SCALES["tiny"]
    with pytest.raises(KeyboardInterrupt):
        convergence.main(scale, progress=False, ensembles=False)
    path = common.results_dir(scale) / "convergence.json"
    partial = json.loads(path.read_text())
    assert list(partial["curves"]) == ["single"] and partial["complete"] is False
    assert "Partial: the curves that have finished so far (single)" in path.with_suffix(".md").read_text()
    assert not common.result_done(scale, "convergence", force=False)
    done = convergence.main(scale, progress=False, ensembles=False)
    assert list(done["curves"]) == ["single", "expanded"] and done["complete"] is True
    assert json.loads(path.read_text())["complete"] is True and common.result_done(scale, "convergence", force=False)


def test_a_comparison_across_budgets_is_judged_against_the_paper_with_its_noise():
    """experiments/across_budgets.judge: per budget agrees / disagrees / no difference (overlapping
    intervals), the movement from the first budget to the last, and whether the gap narrows."""
    from experiments.across_budgets import judge

    def pt(tokens, a, b):  # a, b: (mean, half-width) of MSE
        ci = lambda m, h: {"mean": m, "ci_low": m - h, "ci_high": m + h}  # noqa: E731
        return {"tokens": tokens, "steps": tokens // 10, "methods": {"boosting": {"mse": ci(*a)}, "expanded": {"mse": ci(*b)}}}

    flips = judge([pt(100, (5.0, 0.5), (3.0, 0.5)), pt(300, (2.0, 0.1), (3.0, 0.1))], "mse", "boosting", "expanded", "lower")
    assert [p["verdict"] for p in flips["per_budget"]] == ["disagrees", "agrees"]
    assert flips["change"] == "flips" and flips["gap_trend"] == "changes sign"
    assert [p["gap"] for p in flips["per_budget"]] == [2.0, -1.0]
    vanishes = judge([pt(100, (5.0, 0.5), (3.0, 0.5)), pt(300, (3.2, 0.5), (3.0, 0.5))], "mse", "boosting", "expanded", "lower")
    assert [p["verdict"] for p in vanishes["per_budget"]] == ["disagrees", uncertainty.NO_DIFFERENCE]
    assert vanishes["change"] == "vanishes" and vanishes["gap_trend"] == "narrows"
    stays = judge([pt(100, (1.0, 0.1), (3.0, 0.1)), pt(300, (1.0, 0.1), (5.0, 0.1))], "mse", "boosting", "expanded", "lower")
    assert stays["change"] == "persists" and stays["gap_trend"] == "widens"
    missing = judge([pt(100, (1.0, 0.1), (3.0, 0.1))], "mse", "boosting", "expanded", "lower")
    assert missing["change"] == "n/a" and len(missing["per_budget"]) == 1


def test_table_one_evaluates_each_run_once_and_reads_its_last_budget_record(work, monkeypatch):
    """Every run of table 1 is evaluated at its last step as it trains (boosting included); the
    table's evaluation reads that record (the single SAE: bagging's member-0 entry) instead of
    computing the same metrics on the same contexts again."""
    from experiments import intrinsic

    scale = _scale(members=2, budgets=(64 * 4,))
    acts = ArrayActivations(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32), 0.1)
    calls = []

    def metrics_of(ens, acts, scale):
        calls.append(ens.n_members)
        return {"fvu": float(np.abs(np.asarray(ensemble.decoder(ens))).sum())}

    class Spliced:
        contexts = np.zeros((3, 4))

        def fast(self, ens):
            return {"delta_lm_loss": float(ens.n_members)}

    monkeypatch.setattr(common, "intrinsic_metrics", metrics_of)
    spliced = Spliced()
    for method in ("single", "expanded", "bagging", "boosting"):
        ens, info = intrinsic.table_run(scale, acts, "topk", method, 0, False, spliced)
        trained = len(calls)
        out = intrinsic.evaluate_run(scale, acts, spliced, ens, info)
        assert len(calls) == trained, method  # nothing evaluated twice
        assert out["fvu"] == pytest.approx(metrics_of(ens, acts, scale)["fvu"], rel=1e-6), method
        assert out["delta_lm_loss"] == float(ens.n_members) and "single" not in out and "steps" not in out


def test_a_run_that_passed_the_first_budget_without_its_decoder_gets_a_twin_there(work):
    """Table 1's TopK runs passed the first budget before decoders were kept there: table 1 across
    budgets trains a twin (the same seed, to that budget) for the stability there. The twin's decoder
    is the run's at that step, its MSE equals the run's own evaluation (twin_check), the single SAE
    uses bagging's twin, and once the stability is committed nothing is trained again."""
    from experiments import across_budgets, intrinsic

    scale = _scale(members=2, budgets=(64 * 4,))
    acts = ArrayActivations(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32), 0.1)

    class Spliced:
        contexts = np.zeros((3, 4))

        def fast(self, ens):
            return {"delta_lm_loss": 0.5}

    live = [across_budgets.records(scale, acts, Spliced(), "topk", "bagging", s, 2, False) for s in range(2)]
    kept = [np.load(r[0]["decoder"]) for r in live]
    others = lambda: [n for n, _ in across_budgets.twins_to_train(scale, 8, "topk", 2) if "boosting" not in n]  # noqa: E731
    assert others() == []  # every decoder at hand (expanded: not trained, nothing passed): no twin
    for r in live:  # what a run trained before decoders were kept leaves
        Path(r[0]["decoder"]).unlink()
    assert across_budgets.point(scale, "topk", "bagging", [r[0] for r in live], 8).get("stability") is None
    names = others()
    assert names == [f"topk-k{scale.k}-bagging-J2-s{s}-T256" for s in range(2)]  # the single SAE's twin is bagging's

    twinned = [across_budgets.records(scale, acts, Spliced(), "topk", "bagging", s, 2, False) for s in range(2)]
    assert [r[1:] for r in twinned] == [r[1:] for r in live]  # only the first budget changes: its decoder
    assert [{k: v for k, v in r[0].items() if k != "decoder"} for r in twinned] == [
        {k: v for k, v in r[0].items() if k != "decoder"} for r in live]
    for name, r, want in zip(names, twinned, kept):
        assert Path(r[0]["decoder"]).parent.name == f"{name}.evals"
        np.testing.assert_allclose(np.load(r[0]["decoder"]), want, rtol=1e-5, atol=1e-6)
    got = across_budgets.point(scale, "topk", "bagging", [r[0] for r in twinned], 8)
    want = intrinsic.stability_of(kept, None, 2)
    assert got["stability"] == pytest.approx(want["stability"], abs=1e-5)
    single = [across_budgets.records(scale, acts, Spliced(), "topk", "single", s, 2, False)[0] for s in range(2)]
    assert [r["decoder"] for r in single] == [r[0]["decoder"] for r in twinned]  # bagging's twin, its first rows
    assert across_budgets.point(scale, "topk", "single", single, 8)["stability"] == pytest.approx(
        intrinsic.stability_of([k[: scale.width] for k in kept])["stability"], abs=1e-5)
    check = across_budgets.twin_check(scale, 8, "topk", 2)
    assert [c["twin"] for c in check] == names and all(c["rel_diff"] < 1e-5 for c in check)
    assert others() == []  # their stability is committed now


def test_a_row_finished_in_an_earlier_session_is_read_back_from_its_committed_results(work, monkeypatch):
    """A session's machine starts with an empty work directory: a table-1 row whose records and
    stability vectors were committed is assembled from them (stability as computed from the decoders),
    its budget records and its stability at the smaller budget are read back, and nothing trains."""
    import shutil

    from experiments import across_budgets, intrinsic

    scale = _scale(members=2, budgets=(64 * 4,))
    acts = ArrayActivations(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32), 0.1)
    from saeens.train import fit

    calls = []
    monkeypatch.setattr(common, "intrinsic_metrics", lambda ens, acts, scale: calls.append(1) or {
        "n_features": int(ensemble.decoder(ens).shape[0]),
        **{m: float(ens.n_members) for m in across_budgets.METRICS if m != "delta_lm_loss"}})

    class Spliced:
        contexts = np.zeros((3, 4))

        def fast(self, ens):
            return {"delta_lm_loss": 0.5}

    spliced = Spliced()
    per_seed, decoders = {}, {}
    for method in ("single", "bagging"):
        per_seed[method], decoders[method] = [], []
        for seed in range(2):
            ens, info = intrinsic.table_run(scale, acts, "topk", method, seed, False, spliced)
            per_seed[method].append({"seed": seed, **intrinsic.evaluate_run(scale, acts, spliced, ens, info)})
            decoders[method].append(np.asarray(ensemble.decoder(ens)))
        intrinsic.keep_budget_stability(scale, "topk", method, 2, 8)
    stab = intrinsic.stability_of(decoders["bagging"], intrinsic.vectors_prefix(scale, "topk", "bagging"))
    live = across_budgets.records(scale, acts, spliced, "topk", "bagging", 0, 2, False)
    at_4 = [across_budgets.records(scale, acts, spliced, "topk", m, s, 2, False)[0] for m in ("single",) for s in range(2)]
    live_point = across_budgets.point(scale, "topk", "single", at_4, 8)

    shutil.rmtree(work / "tiny")  # what a new session finds: the committed results, no runs, no decoders
    monkeypatch.setattr("saeens.train.fit", lambda *a, **k: pytest.fail("a committed row was trained again"))
    got, got_stab = intrinsic.committed_row(scale, "topk", "bagging", 2, 8)
    assert got == per_seed["bagging"]
    assert got_stab["stability"] == pytest.approx(stab["stability"], abs=2e-3)  # float16 vectors
    assert got_stab["stability_chance"] == stab["stability_chance"]
    assert np.isnan(got_stab["hungarian_stability"]) and "not kept" in got_stab["hungarian_skipped"]
    assert intrinsic.committed_row(scale, "topk", "single", 2, 8) is None  # its vectors were never written
    assert across_budgets.records(scale, acts, spliced, "topk", "bagging", 0, 2, False) == live
    again = [across_budgets.records(scale, acts, spliced, "topk", "single", s, 2, False)[0] for s in range(2)]
    assert not any(Path(r["decoder"]).is_file() for r in again)
    back = across_budgets.point(scale, "topk", "single", again, 8)
    assert back["stability"] == pytest.approx(live_point["stability"], abs=2e-3)
    assert across_budgets.point(scale, "topk", "expanded", [{**r, "tokens": 64} for r in again], 8).get("stability") is None

    monkeypatch.setattr("saeens.train.fit", fit)  # a row that must be trained again (for its decoders)
    calls.clear()
    intrinsic.table_run(scale, acts, "topk", "bagging", 0, False, spliced)
    assert not calls and Path(again[0]["decoder"]).is_file()  # stopped at the smaller budget, evaluated nothing


def test_table_one_reads_back_finished_rows_and_a_retrained_bagging_row_leaves_single_stability(work, monkeypatch):
    """intrinsic.main in a session that lost its runs: the single row (records and vectors committed)
    is read back, the bagging row is trained again, and its decoders at the smaller budget also give
    the single SAE's stability there (bagging's first rows), committed for table 1 across budgets."""
    import shutil

    from experiments import intrinsic

    scale = _scale(members=2, budgets=(64 * 4,), other_archs=())
    acts = ArrayActivations(np.random.default_rng(0).standard_normal((2000, 8)).astype(np.float32), 0.1)
    monkeypatch.setattr(common, "intrinsic_metrics", lambda ens, acts, scale: {
        "n_features": int(ensemble.decoder(ens).shape[0]), **{m: 1.0 for m in intrinsic.METRICS}})

    class Spliced:
        contexts = np.zeros((3, 4))

        def __init__(self, *a):
            pass

        def fast(self, ens):
            return {"delta_lm_loss": 0.5}

    monkeypatch.setattr(common, "get_cache", lambda *a, **k: acts)
    monkeypatch.setattr(common, "Spliced", Spliced)
    monkeypatch.setattr(intrinsic, "setting", lambda scale, acts: {})
    monkeypatch.setattr(intrinsic, "markdown", lambda result: "")
    monkeypatch.setattr(intrinsic, "plot", lambda result, out: None)
    monkeypatch.setattr(common, "METHODS", ("single", "bagging"))
    first = intrinsic.main(scale, progress=False)
    budgets_dir = common.results_dir(scale) / "stability" / "budgets"
    for p in budgets_dir.glob("*"):
        p.unlink()
    for p in (common.results_dir(scale) / "stability").glob("topk-bagging*"):
        p.unlink()  # the bagging row's stability was never computed (as table 1's ReLU bagging row)
    (common.results_dir(scale) / "intrinsic.json").unlink()
    shutil.rmtree(work / "tiny")  # a new session: the bagging row must be trained again for its stability
    again = intrinsic.main(scale, progress=False)
    assert [r["stability"] for r in again["rows"]] == pytest.approx([r["stability"] for r in first["rows"]], abs=2e-3)
    assert sorted(p.name for p in budgets_dir.glob("*.npy")) == [
        f"topk-{m}-T256-s{s}.npy" for m in ("bagging", "single") for s in range(2)]


def _clocked_child(path, seconds, then=""):
    """A process that spends `seconds` inside common.clock (short beats), touching path.started
    once inside, then runs `then` there."""
    code = ("import os, signal, sys, time\nfrom pathlib import Path\nfrom experiments import common\n"
            "p = Path(sys.argv[1])\nwith common.clock(p, every=0.1, beat=0.02):\n"
            f"    p.with_suffix('.started').touch()\n    time.sleep({seconds})\n    {then or 'pass'}\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    while not path.with_suffix(".started").exists() and proc.poll() is None:
        time.sleep(0.01)
    return proc


def test_a_runs_clock_keeps_the_time_of_a_killed_session_and_skips_a_stopped_one(tmp_path):
    """The wall time inside `common.clock` reaches its file while the run goes on, so a SIGKILL
    (a session's end: no `finally` runs) loses one interval, not the session; time stopped by
    SIGSTOP (the study paused to time something alone) is not counted."""
    killed = tmp_path / "killed.json"
    t0 = time.perf_counter()
    assert _clocked_child(killed, 1.0, "os.kill(os.getpid(), signal.SIGKILL)").wait() == -9
    life = time.perf_counter() - t0  # the child's whole life bounds its time inside the clock, however loaded the machine
    assert 0.5 <= json.loads(killed.read_text())["seconds"] <= life

    paused = tmp_path / "paused.json"
    proc = _clocked_child(paused, 2.0)
    time.sleep(0.5)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(1.2)
    proc.send_signal(signal.SIGCONT)
    assert proc.wait() == 0
    assert 0.6 <= json.loads(paused.read_text())["seconds"] < 1.3  # 2 s inside, 1.2 of them stopped


def test_pareto_findings_count_a_gap_inside_table_1s_seed_spread_as_no_difference():
    """A Pareto point is one seed: against a reference front at equal L0 (interpolated in log L0) a
    gap no wider than table 1's widest seed range of the metric is 'within', not a lead."""
    from experiments import report

    def pts(*l0_fvu):
        return [{"l0": l0, "fvu": fvu, "delta_lm_loss": fvu} for l0, fvu in l0_fvu]

    pa = {"points": {"single": pts((8, 0.40), (32, 0.30)), "expanded": pts((8, 0.40), (32, 0.30)),
                     "bagging": pts((16, 0.34), (64, 0.2)),  # the fronts at L0 16: 0.35 (log-linear)
                     "boosting": pts((16, 0.36), (20, 0.335))}}
    t1 = {"rows": [{"arch": "topk", "method": "single", "fvu": {"scores": [0.5, 0.502]},
                    "delta_lm_loss": {"scores": [0.1, 0.1]}}]}
    assert report.seed_spread(t1, "topk", "fvu") == pytest.approx(0.002)
    lines = report.pareto_findings(pa, t1)
    bag = next(x for x in lines if "(fvu), bagging vs single" in x)
    assert "lower fvu at 1 of its 2 points, higher at 0, 0 within" in bag and "1 lie outside" in bag
    boost = next(x for x in lines if "(fvu), boosting vs single" in x)  # 0.36 vs 0.35 higher; 0.335 vs 0.334 within
    assert "lower fvu at 0 of its 2 points, higher at 1, 1 within table 1's seed spread of fvu (0.002" in boost
    assert "every gap counts" in report.pareto_findings(pa)[0]  # no table 1: no band
    pa["points"]["bagging"][1]["l0"] = 32.01  # a measured L0 at the front's end (k = 32): inside, not beyond
    assert "lower fvu at 2 of its 2 points" in report.pareto_findings(pa, t1)[0]


def test_sweep_findings_pair_each_members_gain_within_its_ensemble():
    """The gain of member j is paired within each independent ensemble (its j- and (j-1)-prefixes) and
    carries a Student-t interval over the ensembles (a NumPy/SciPy reference); a last gain whose
    interval holds zero is 'no change beyond the noise'; stability is printed beside its chance."""
    from scipy import stats as sps

    from experiments import report

    ev_runs = np.array([[0.40, 0.50, 0.55, 0.570], [0.30, 0.42, 0.48, 0.501], [0.50, 0.58, 0.62, 0.642]])
    flat = ev_runs.copy()
    flat[:, 3] = flat[:, 2] + np.array([0.01, -0.01, 0.0])  # the last member adds nothing on average

    def sweep(ev):
        rows = [[{"explained_variance": float(v), "delta_lm_loss": 0.1} for v in run] for run in ev]
        curves = {"explained_variance": {"mean": ev.mean(0).tolist()},
                  "delta_lm_loss": {"mean": [0.1] * 4},
                  "stability": {"mean": [0.6, 0.62, 0.63, 0.64], "chance": [0.15, 0.16, 0.17, 0.17]}}
        return curves, rows

    sw = {"curves": {}, "runs": {}}
    (sw["curves"]["bagging"], sw["runs"]["bagging"]), (sw["curves"]["boosting"], sw["runs"]["boosting"]) = \
        sweep(ev_runs), sweep(flat)
    d = ev_runs[:, 3] - ev_runs[:, 2]
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    g = report.member_gain(sw["runs"]["bagging"], "explained_variance", 4)
    assert (g["mean"], g["ci_low"], g["ci_high"]) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half))
    bag, boost = report.sweep_findings(sw)
    assert f"the last member (J = 4) {d.mean():.3f} [{d.mean() - half:.3f}, {d.mean() + half:.3f}]" in bag
    assert "(J = 4) " in boost and "): a rise beyond the noise" in bag and "): no change beyond the noise" in boost
    assert "changes it by 0.000 [0.000, 0.000]: no change beyond the noise" in bag  # delta LM loss flat
    assert "Stability J = 1 -> 4: 0.600 (4.00x chance 0.150) -> 0.640 (3.76x chance 0.170)" in bag
    sw["runs"]["bagging"] = sw["runs"]["bagging"][:1]  # one ensemble: no interval, no verdict
    assert "no interval (fewer than two ensembles)" in report.sweep_findings(sw)[0]


def test_findings_label_a_partial_result_and_only_that(tmp_path, monkeypatch):
    """A part written before all of it has run ("complete": false, e.g. bagging's curves of figure 2
    before boosting's) says so in the findings; a complete one does not."""
    from experiments import report

    monkeypatch.setattr(common, "ROOT", tmp_path / "experiments")  # results/gpu lands here
    scale = common.SCALES["gpu"]
    sweep = {"curves": {}, "runs": {}}
    common.write_result(scale, "effect_of_j", {**sweep, "complete": False}, "")
    common.write_result(scale, "pareto", {"points": {m: [] for m in ("single", "expanded", "bagging", "boosting")},
                                          "complete": True}, "")
    sections = {s.split("\n", 1)[0]: s for s in report.findings(scale).split("### ")[1:]}
    assert "- partial: what has finished so far" in sections["The effect of J (figure 2)"]
    assert "partial" not in sections["Sparsity vs fidelity (figure 3)"]


def test_stage_residual_is_boostings_own_stage_2_input_in_activation_units(tmp_path):
    """boosting_stages trains single SAEs on StageResidual: the rows minus the saved (activation-unit)
    stage 1's reconstruction must be what boosting's stage 2 reads, x * scale through stage 1, over scale."""
    import jax
    import jax.numpy as jnp

    from experiments.boosting_stages import StageResidual
    from saeens import train
    from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
    from saeens.data.cache import batch_indices
    from saeens.runs import load_ensemble
    from saeens.train import boosting

    rng = np.random.default_rng(0)
    acts = ArrayActivations((5.0 * rng.standard_normal((1000, 8))).astype(np.float32), 0.1)
    run = RunConfig(SAEConfig(d_in=8, width=32, arch="topk", k=4, dead_tokens=256),
                    TrainConfig(n_tokens=64 * 6, batch_size=64, lr=3e-3, checkpoint_every=6), EnsembleConfig("boosting", 2))
    train.fit(tmp_path, run, acts, progress=False)
    ens, _ = load_ensemble(tmp_path)
    method = train.build_method(run)
    state = train.checkpoints.restore(train.checkpoints.manager(tmp_path),
                                      jax.eval_shape(method.init, jax.random.key(0), jnp.zeros((8, 8))))
    assert float(state.scale) != pytest.approx(1.0, abs=0.1)  # the units differ, so the check can fail
    source = StageResidual(acts, ensemble.single(ens.cfg, ensemble.member(ens, 0)), "stage 1")
    x = acts.gather(batch_indices(acts.n_rows("train"), 64, 0, 3))
    want = boosting.residual_before(state.params, run.sae, jnp.asarray(x) * state.scale, 1) / state.scale
    np.testing.assert_allclose(source.batch(3, 64, 0), want, rtol=1e-4, atol=1e-4)
    assert float(np.abs(want - x).max()) > 0.1  # stage 1 reconstructs something
