"""`python -m experiments.run_all --scale gpu` at toy size on CPU: the GPU scale's command path
(planned hours, convergence curves, table 1 with the single row taken from bagging's members and
budget evaluations on the way, findings), written under a temporary work and results directory."""

import dataclasses
import json

import numpy as np
import pytest

from experiments import across_budgets, boosting_stages, common, convergence, intrinsic, pareto, report, run_all


@pytest.fixture
def toy_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "WORK", tmp_path / "work")
    monkeypatch.setattr(common, "ROOT", tmp_path / "experiments")  # results/gpu lands here, not in the repository
    tiny = common.SCALES["tiny"]
    toy = dataclasses.replace(common.SCALES["gpu"], cache_tokens=tiny.cache_tokens, context_length=tiny.context_length,
                              width=16, k=4, members=2, train_tokens=2048, batch_size=128, checkpoint_every=4,
                              spliced_contexts=2, sweep_spliced_contexts=2, connectivity_tokens=128,
                              hungarian_max_features=64, batch_forward=8, budgets=(512,), pareto_ks=(4,))
    monkeypatch.setitem(common.SCALES, "gpu", toy)
    monkeypatch.setitem(convergence.PLANS, "gpu", convergence.Plan(
        single_tokens=2048, expanded_tokens=1024, ensemble_tokens=1024, boosting_max=512, ensemble_members=2,
        points=(512, 1024, 2048)))
    monkeypatch.setattr(run_all, "STEPS", (("convergence", convergence.main), ("intrinsic", intrinsic.main),
                                           ("across_budgets", across_budgets.main),
                                           ("boosting_stages", boosting_stages.main), ("report", report.main)))
    return toy


def test_gpu_scale_command_path_at_toy_size(toy_gpu, tmp_path, capsys):
    run_all.main(toy_gpu, progress=False)
    out = capsys.readouterr().out
    assert '"total_hours"' in out  # the plan is printed before anything trains
    results = tmp_path / "experiments" / "results" / "gpu"
    conv = json.loads((results / "convergence.json").read_text())
    single = conv["curves"]["single"]
    assert single["tokens"] == [512, 1024, 2048] and single["steps"] == [4, 8, 16]
    assert all(0 < c < 1 for c in single["stability_chance"]) and len(single["stability"]["mean"]) == 3
    assert conv["curves"]["boosting J=2"]["tokens"] == [512] and conv["complete"] is True
    assert (results / "convergence.png").is_file()
    t1 = json.loads((results / "intrinsic.json").read_text())
    assert t1["complete"] is True
    rows = {r["method"]: r for r in t1["rows"]}
    assert set(rows) == {"single", "expanded", "bagging", "boosting"}
    assert all("stability_chance" in r and r["stability_over_chance"] > 0 for r in rows.values())
    singles = t1["runs"]["topk/single"]
    assert all(s["member_of"].endswith(f"bagging-J2-s{s['seed']}") for s in singles)  # no runs of its own
    assert not any("single" in p.name for p in (common.WORK / "gpu" / "runs").iterdir()  # table 1 trains no single SAE
                   if "convergence" not in p.name and "-on-stage1-" not in p.name)  # (those: boosting_stages')
    budget_files = sorted(p.name for p in (results / "budgets").iterdir())
    assert "topk-k4-bagging-J2-s0-4.json" in budget_files
    # boosting's stage length is its budget: no point on the way, a twin run at the old budget instead
    assert "topk-k4-boosting-J2-s0-4.json" not in budget_files and "topk-k4-boosting-J2-s0-T512-4.json" in budget_files
    rec = json.loads((results / "budgets" / "topk-k4-bagging-J2-s0-4.json").read_text())
    assert rec["tokens"] == 512 and "single" in rec and "delta_lm_loss" in rec
    assert sorted(p.name for p in (results / "stability").glob("*.npy"))[:2] == ["topk-bagging-s0.npy", "topk-bagging-s1.npy"]
    ab = json.loads((results / "across_budgets.json").read_text())["archs"]["topk"]
    assert [p["tokens"] for p in ab["points"]] == [512, 2048]  # the old budget and table 1's, the same seeds
    assert all(set(p["methods"]) == {"single", "expanded", "bagging", "boosting"} for p in ab["points"])
    last = ab["points"][-1]["methods"]
    for m in ("single", "expanded", "bagging", "boosting"):  # the last point is table 1's row
        assert last[m]["mse"]["mean"] == pytest.approx(rows[m]["mse"]["mean"], rel=1e-5)
        assert last[m]["stability"] == pytest.approx(rows[m]["stability"], rel=1e-3)  # from its float16 vectors
    assert (common.WORK / "gpu" / "runs" / "topk-k4-boosting-J2-s1-T512" / "ensemble.json").is_file()
    assert all(len(c["per_budget"]) == 2 and c["change"] != "n/a" for c in ab["claims"])
    assert (results / "stability" / "budgets" / "topk-single-T512-s0.npy").is_file()
    assert not list((results / "stability" / "budgets").glob("*-T2048-*"))  # table 1's budget: its own vectors, kept once
    for rec in t1["runs"]["topk/boosting"]:  # each stage's l0 (at most k), splitting the ensemble's
        assert len(rec["l0_per_member"]) == 2 and all(0 < v <= 4 for v in rec["l0_per_member"])
        assert sum(rec["l0_per_member"]) == pytest.approx(rec["l0"], rel=1e-5)
    assert "## Each member's (boosting: each stage's) l0" in (results / "intrinsic.md").read_text()
    text = (results / "findings.md").read_text()
    assert "chance level" in text and "as the budget grows" in text and "512 tokens:" in text
    assert "**Boosting's stages, topk**" in text and "the last 1 stages fire" in text
    per_stage = rows["boosting"]["stability_per_member"]  # the run's score is the mean of its two equal stages'
    assert len(per_stage) == 2 and np.mean(per_stage) == pytest.approx(rows["boosting"]["stability"], rel=1e-5)
    assert "stability of each stage's features: " in text and "stability per member: " in (results / "intrinsic.md").read_text()
    assert len(ab["points"][0]["methods"]["boosting"]["stability_per_member"]) == 2  # the twins at the old budget
    assert "topk, boosting's stability of each stage's features (2 runs): 512 tokens: " in text and "; 2,048 tokens: " in text
    bs = json.loads((results / "boosting_stages.json").read_text())  # SAEs on one stage-1 residual, per budget
    assert bs["complete"] is True and [b["tokens"] for b in bs["budgets"]] == [512, 2048]
    old, new = bs["budgets"]
    assert [r["runs"] for r in old["rows"]] == [2, 2, 2] and len(new["rows"]) == 2
    assert all(r["stability_chance"] > 0 and r["stability_over_chance"] > 0 for b in bs["budgets"] for r in b["rows"])
    # stage 1 against the other runs' stage 1 only: at most its stability against their whole ensembles
    assert old["rows"][0]["stability"] <= ab["points"][0]["methods"]["boosting"]["stability_per_member"][0] + 1e-3
    assert new["rows"][0]["stability"] == rows["single"]["stability"]  # table 1's single row, read back
    assert old["reading"].startswith(("identifiability: ", "cascade: ", "no reading: "))  # toy SAEs: near chance
    assert "on one stage-1 residual" in new["reading"]
    assert "Why boosting's later stages are not reproduced, 2,048 tokens" in text
    # a later session whose machine lost the old budget's runs reads that budget back, trains nothing for it
    (results / "boosting_stages.json").write_text(json.dumps({**bs, "budgets": [old], "complete": False}))
    import shutil
    for p in (common.WORK / "gpu" / "runs").iterdir():
        if "-T512" in p.name:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    again = boosting_stages.main(toy_gpu, progress=False)
    assert again["budgets"] == [old, new] and again["complete"] is True
    assert not any("-T512" in p.name for p in (common.WORK / "gpu" / "runs").iterdir())


def test_pareto_front_at_toy_size_takes_each_single_sae_from_a_bagging_run(toy_gpu, tmp_path):
    """Every method at the table's k and at another k; at the other k the single SAE is member 0
    of that k's bagging run (no single run is trained), as in table 1."""
    scale = dataclasses.replace(toy_gpu, pareto_ks=(4, 8), pareto_members=2)
    result = pareto.main(scale, progress=False)
    points = result["points"]
    assert {m: [p["k"] for p in points[m]] for m in points} == {m: [4, 8] for m in common.METHODS}
    single8 = points["single"][1]
    assert single8["member_of"].endswith("topk-k8-bagging-J2-s0") and single8["run_dir"].endswith("/member-0")
    assert single8["l0"] <= 8 and points["bagging"][1]["l0"] > single8["l0"]  # bagging's L0: the members' sum
    assert single8["train_flops"] == pytest.approx(points["bagging"][1]["train_flops"] / 2)
    assert not any("single" in p.name for p in (common.WORK / "gpu" / "runs").iterdir())
    results = tmp_path / "experiments" / "results" / "gpu"
    assert {p.name for p in results.glob("pareto.*")} == {"pareto.json", "pareto.md", "pareto.png"}


def test_pareto_points_are_read_back_by_a_session_without_the_runs(toy_gpu, tmp_path, monkeypatch):
    """Each point's record is committed as it lands; a new session's machine (no runs) rebuilds the
    figure from them without training."""
    import shutil

    first = pareto.main(toy_gpu, progress=False)
    assert len(list((tmp_path / "experiments" / "results" / "gpu" / "pareto").glob("*.json"))) == 4
    shutil.rmtree(common.WORK / "gpu" / "runs")
    monkeypatch.setattr("saeens.train.fit", lambda *a, **k: pytest.fail("a committed point was trained again"))
    again = pareto.main(toy_gpu, force=True, progress=False)
    assert again["points"] == first["points"]


def test_the_j_sweep_writes_each_method_as_it_lands_and_a_rerun_finishes_the_rest(toy_gpu, monkeypatch):
    """Bagging's curves are written (complete: false) before boosting starts; a rerun in a session
    without the runs reads them back and trains only what boosting needs."""
    import shutil

    from experiments import effect_of_j

    plotted, real_plot = [], effect_of_j.plot
    monkeypatch.setattr(effect_of_j, "plot", lambda scale, r: plotted.append(sorted(r["curves"])) or real_plot(scale, r))
    full = effect_of_j.main(toy_gpu, progress=False)
    assert full["complete"] and set(full["curves"]) == {"bagging", "boosting"} and full["seeds"] == toy_gpu.seeds
    assert plotted == [["bagging"], ["bagging", "boosting"]]  # the partial result gets its plot too
    assert (common.results_dir(toy_gpu) / "effect_of_j.png").is_file()
    stab = full["curves"]["bagging"]["stability"]
    assert len(stab["mean"]) == toy_gpu.members and all(0 < c < m for c, m in zip(stab["chance"], stab["mean"]))
    path = common.results_dir(toy_gpu) / "effect_of_j.json"
    partial = {**full, "complete": False, "curves": {"bagging": full["curves"]["bagging"]}, "runs": {"bagging": full["runs"]["bagging"]}}
    path.write_text(json.dumps(partial))
    shutil.rmtree(common.WORK / "gpu" / "runs")
    called = []
    real = effect_of_j.table_run
    monkeypatch.setattr(effect_of_j, "table_run", lambda scale, acts, arch, method, *a: called.append(method)
                        or real(scale, acts, arch, method, *a))
    again = effect_of_j.main(toy_gpu, progress=False)
    assert set(called) == {"boosting"} and again["complete"]
    assert json.loads(json.dumps(again["curves"])) == json.loads(json.dumps(full["curves"]))


def test_the_j_sweep_commits_each_ensemble_and_a_later_session_trains_only_the_rest(toy_gpu, monkeypatch):
    """A session that ends after boosting's first ensemble has committed its prefix metrics and its
    float16 decoder rows; the next session (no runs) trains only the other seeds, and the curves equal
    an uninterrupted sweep's. The decoder files go once the curves are written."""
    import shutil

    from experiments import effect_of_j

    full = effect_of_j.main(toy_gpu, progress=False)
    decoders = common.results_dir(toy_gpu) / "effect_of_j-decoders"
    assert not decoders.exists()
    shutil.rmtree(common.WORK / "gpu" / "runs")
    real = effect_of_j.table_run

    def session_ends_after_boosting_seed_0(scale, acts, arch, method, seed, *a):
        if method == "boosting" and seed == 1:
            raise KeyboardInterrupt
        return real(scale, acts, arch, method, seed, *a)

    monkeypatch.setattr(effect_of_j, "table_run", session_ends_after_boosting_seed_0)
    with pytest.raises(KeyboardInterrupt):
        effect_of_j.main(toy_gpu, force=True, progress=False)
    partial = common.read_result(toy_gpu, "effect_of_j")
    assert partial["complete"] is False and set(partial["curves"]) == {"bagging"} and len(partial["runs"]["boosting"]) == 1
    assert sorted(p.name for p in decoders.iterdir()) == ["boosting-s0.npy"]
    assert np.load(decoders / "boosting-s0.npy").dtype == np.float16
    assert "1 of 2 ensembles done" in (common.results_dir(toy_gpu) / "effect_of_j.md").read_text()
    shutil.rmtree(common.WORK / "gpu" / "runs")
    d_in = common.get_cache(toy_gpu, False).d_in
    for part in ("intrinsic", "boosting_stages", "concept_detection", "spurious_removal"):  # else they count
        common.write_result(toy_gpu, part, {"complete": True}, "")  # table 1's runs first
    left = run_all.remaining(toy_gpu, d_in)["effect_of_j"]  # boosting's seed 1 alone is still to train
    _, seed_1 = intrinsic.row_run(toy_gpu, d_in, "topk", "boosting", 1)
    assert left == {"topk": pytest.approx(common.train_flops(seed_1, toy_gpu.cache_tokens) / 1e12)}
    called = []
    monkeypatch.setattr(effect_of_j, "table_run", lambda scale, acts, arch, method, seed, *a: called.append((method, seed))
                        or real(scale, acts, arch, method, seed, *a))
    again = effect_of_j.main(toy_gpu, progress=False)
    assert called == [("boosting", 1)] and again["complete"] and not decoders.exists()
    assert json.loads(json.dumps(again["curves"])) == json.loads(json.dumps(full["curves"]))


def test_a_committed_j_sweep_seed_counts_only_with_its_decoder_file(toy_gpu):
    """committed_seeds: seed 0 on, up to the first seed whose decoder file is missing, and no more than
    the scale's seeds (the rest train again)."""
    from experiments import effect_of_j

    result = {"runs": {"boosting": [["s0"], ["s1"], ["s2"], ["s3"]]}}
    for seed in (0, 2, 3):
        path = effect_of_j.decoder_path(toy_gpu, "boosting", seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, np.zeros((4, 2), np.float16))
    assert effect_of_j.committed_seeds(toy_gpu, "boosting", result) == [["s0"]]
    np.save(effect_of_j.decoder_path(toy_gpu, "boosting", 1), np.zeros((4, 2), np.float16))
    assert toy_gpu.sweep_seeds is None and toy_gpu.seeds == 2
    assert effect_of_j.committed_seeds(toy_gpu, "boosting", result) == [["s0"], ["s1"]]
    assert effect_of_j.committed_seeds(toy_gpu, "bagging", result) == []
    effect_of_j.drop_decoders(toy_gpu, "boosting")
    assert not effect_of_j.decoder_path(toy_gpu, "boosting", 0).parent.exists()


def test_float16_decoder_rows_keep_stability():
    """The J sweep's stability comes from float16 rows: the same figure as float32 to 1e-4."""
    from saeens import metrics

    rng = np.random.default_rng(0)
    base = rng.standard_normal((64, 32)).astype(np.float32)
    decs = [base + 0.3 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(3)]
    decs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in decs]
    exact = metrics.stability(decs)["mean"]
    assert metrics.stability([d.astype(np.float16).astype(np.float32) for d in decs])["mean"] == pytest.approx(exact, abs=1e-4)
    assert exact > 0.8


def test_concept_detection_writes_each_finished_dataset_and_a_rerun_finishes_it(toy_gpu, tmp_path, monkeypatch):
    """Probing pools every dataset's documents through the model (the long part at full scale): each
    finished dataset is written at once (marked incomplete), and a rerun pools only what is missing
    and gives the same result."""
    from experiments import concept_detection

    scale = dataclasses.replace(toy_gpu, probe_train_per_class=4, probe_test_per_class=2, probe_context=16)
    first = concept_detection.main(scale, progress=False)
    assert first["complete"] is True and list(first["datasets"]) == list(concept_detection.DATASETS)
    for d in first["datasets"].values():  # boosting's stages probed alone; stage 1 is the single SAE (one key)
        by = d["methods"]
        assert len(by["boosting"]["stages"]) == scale.members and "stages" not in by["bagging"]
        assert by["boosting"]["stages"][0]["tasks"] == by["single"]["tasks"]
    assert concept_detection.stages_of(first, "boosting") == scale.members
    assert "| MEAN | boosting stage 2 alone |" in " ".join(concept_detection.markdown(first).split())
    line = next(x for x in report.findings(scale).splitlines() if "boosting's stages probed alone" in x)
    assert "stage 1 " in line and "; against stage 1: stage 2 " in line
    same = concept_detection.paired_ci(first, "boosting", "single", 1, (0, None))  # stage 1 is the single SAE
    assert same["mean"] == same["ci_low"] == same["ci_high"] == 0.0
    assert "paired over the same test documents" in next(x for x in report.findings(scale).splitlines()
                                                          if x.startswith("- **Concept detection**"))
    results = tmp_path / "experiments" / "results" / "gpu"
    last = concept_detection.DATASETS[-1]
    partial = {**first, "datasets": {n: d for n, d in first["datasets"].items() if n != last}, "complete": False}
    (results / "concept_detection.json").write_text(json.dumps(partial))
    assert "**Partial**" in concept_detection.markdown(partial)
    assert report.load_or_first(scale, "concept_detection")[2].startswith(" (partial: ")  # the README block says so
    pooled = []
    real = concept_detection.pool_documents
    monkeypatch.setattr(concept_detection, "pool_documents", lambda *a, **k: pooled.append(1) or real(*a, **k))
    again = concept_detection.main(scale, progress=False)
    assert len(pooled) == 2  # the missing dataset's train and test documents, nothing else
    assert json.loads(json.dumps(again)) == json.loads(json.dumps(first))
    assert concept_detection.main(scale, progress=False) is None  # complete: skipped


def test_pooling_keeps_each_batch_so_an_interrupted_pass_resumes_and_a_changed_ensemble_pools_again(toy_gpu,
                                                                                                   monkeypatch):
    """SCR and probing pool thousands of documents through the model in one pass (~15 min at full
    scale): a kept batch is read back, not pooled again, and only a batch that is missing is."""
    import jax

    from experiments import downstream

    acts = common.get_cache(toy_gpu, False)
    ens = tuple(downstream.method_ensembles(toy_gpu, acts, False).values())
    texts = [f"Document {i} says something about the weather and the news." for i in range(19)]  # 3 batches of 8
    first = downstream.pool_documents(toy_gpu, texts, ens, 16, keep="probe")
    root = common.WORK / toy_gpu.name / "pooled" / "probe"
    (folder,) = root.iterdir()
    batches = sorted(folder.iterdir())
    assert len(batches) == 3
    batches[1].unlink()  # a session ended before this batch was written
    calls = []
    real = downstream._pool_many
    monkeypatch.setattr(downstream, "_pool_many", lambda *a: calls.append(1) or real(*a))
    again = downstream.pool_documents(toy_gpu, texts, ens, 16, keep="probe")
    assert len(calls) == 1  # only the missing batch went through the model
    np.testing.assert_array_equal(again[0], first[0])
    for a, b in zip(again[1], first[1]):
        np.testing.assert_array_equal(a, b)
    changed = (jax.tree.map(lambda x: x * 1.5, ens[0]),) + ens[1:]  # other parameters: nothing stale is read
    calls.clear()
    downstream.pool_documents(toy_gpu, texts, changed, 16, keep="probe")
    assert len(calls) == 3 and folder not in list(root.iterdir())  # the stale fingerprint is removed


def test_downstream_tables_at_the_first_budget_use_the_twins_and_the_report_says_how_each_comparison_moved(toy_gpu):
    """Probing and SCR of the seed-0 twins (the first study's budget, today's protocol) beside the same
    at table 1's budget: the report compares every pair of methods at both and names the movement."""
    from experiments import concept_detection, downstream_budgets, spurious_removal

    scale = dataclasses.replace(toy_gpu, probe_train_per_class=4, probe_test_per_class=2, probe_context=16,
                                scr_train_per_group=4, scr_test_per_group=2, scr_ns=(2, 5))
    first = downstream_budgets.main(scale, progress=False)
    cd, scr = first["concept_detection"], first["spurious_removal"]
    assert cd["first_budget"] and scr["first_budget"] and cd["train_tokens"] == scr["train_tokens"] == 512
    twins = {common.runs_dir(scale) / f"topk-k4-{m}-J2-s0-T512" for m in ("expanded", "bagging", "boosting")}
    assert all((t / "ensemble.json").is_file() for t in twins)
    results = common.results_dir(scale)
    assert "512 tokens per SAE (the first study's budget" in (results / "spurious_removal-first-budget.md").read_text()
    assert not (results / "concept_detection.json").exists()  # table 4 itself is another result
    table = concept_detection.main(scale, progress=False), spurious_removal.main(scale, progress=False)
    assert table[0]["train_tokens"] == scale.train_tokens and not table[0]["first_budget"]
    text = report.findings(scale)
    assert "At the first study's budget (512 tokens per SAE" in text
    for title in ("Concept detection, mean top-1, 512 -> 2,048", "SCR, best score over N, 512 -> 2,048"):
        line = next(x for x in text.splitlines() if title in x)
        assert line.count(" vs ") == 6 and "single vs expanded: " in line  # every pair, at both budgets
    assert downstream_budgets.main(scale, progress=False) == {"concept_detection": None, "spurious_removal": None}
