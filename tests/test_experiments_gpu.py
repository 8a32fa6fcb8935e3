"""`python -m experiments.run_all --scale gpu` at toy size on CPU: the GPU scale's command path
(planned hours, convergence curves, table 1 with the single row taken from bagging's members and
budget evaluations on the way, findings), written under a temporary work and results directory."""

import dataclasses
import json

import pytest

from experiments import common, convergence, intrinsic, report, run_all


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
                                           ("report", report.main)))
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
    rows = {r["method"]: r for r in t1["rows"]}
    assert set(rows) == {"single", "expanded", "bagging", "boosting"}
    assert all("stability_chance" in r and r["stability_over_chance"] > 0 for r in rows.values())
    singles = t1["runs"]["topk/single"]
    assert all(s["member_of"].endswith(f"bagging-J2-s{s['seed']}") for s in singles)  # no runs of its own
    assert not any("single" in p.name for p in (common.WORK / "gpu" / "runs").iterdir() if "convergence" not in p.name)
    budget_files = sorted(p.name for p in (results / "budgets").iterdir())
    assert "topk-k4-bagging-J2-s0-4.json" in budget_files and not any("boosting" in n and "convergence" not in n
                                                                       for n in budget_files)
    rec = json.loads((results / "budgets" / "topk-k4-bagging-J2-s0-4.json").read_text())
    assert rec["tokens"] == 512 and "single" in rec and "delta_lm_loss" in rec
    assert sorted(p.name for p in (results / "stability").iterdir())[:2] == ["topk-bagging-s0.npy", "topk-bagging-s1.npy"]
    assert (results / "findings.md").is_file() and "chance level" in (results / "findings.md").read_text()
