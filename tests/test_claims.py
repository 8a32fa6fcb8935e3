"""Issue-level claims on synthetic data at J = 4, through the CLI: boosting reconstructs better than
a single SAE, and bagging ensembles are more stable across seeds than single SAEs."""

import json

from saeens.cli import main

COMMON = ["--arch", "topk", "--k", "4", "--width", "32", "--tokens", "30720", "--batch-size", "512", "--lr", "3e-3", "--quiet"]


def test_boosting_beats_single_and_bagging_is_more_stable(tmp_path):
    acts = tmp_path / "acts"
    assert main(["synthetic", "--out", str(acts), "--d-in", "32", "--features", "192", "--tokens", "20000", "--active", "5"]) == 0

    def train(name, method, members, seed):
        out = tmp_path / f"{name}{seed}"
        assert main(["train", "--activations", str(acts), "--out", str(out), "--method", method,
                     "--members", str(members), "--seed", str(seed), *COMMON]) == 0
        return str(out)

    def evaluate(run):
        assert main(["evaluate", run, "--activations", str(acts), "--json", f"{run}.json", "--quiet"]) == 0
        return json.loads(open(f"{run}.json").read())

    def stability(runs, name):
        assert main(["stability", *runs, "--json", str(tmp_path / f"{name}.json")]) == 0
        return json.loads((tmp_path / f"{name}.json").read_text())

    singles = [train("single", "single", 1, s) for s in range(4)]
    bags = [train("bagging", "bagging", 4, s) for s in range(4)]
    boost = train("boosting", "boosting", 4, 0)
    ev_single, ev_boost = evaluate(singles[0])["explained_variance"], evaluate(boost)["explained_variance"]
    assert ev_boost > ev_single + 0.05, (ev_boost, ev_single)
    s_single, s_bag = stability(singles, "s"), stability(bags, "b")
    assert s_bag["stability"] > s_single["stability"], (s_bag["stability"], s_single["stability"])
    assert s_bag["stability_ci_low"] > s_single["stability_ci_high"]
