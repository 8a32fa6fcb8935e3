"""Stability's chance level: the same computation on random unit vectors of the same counts, and
`saeens stability` printing every figure beside it and as a ratio over it."""

import json

import numpy as np
import pytest

from saeens import metrics
from saeens.cli import main


def test_chance_is_stability_of_seeded_random_unit_vectors_of_the_same_counts():
    random = metrics.random_decoders([40, 40, 80], 16, seed=3)
    assert [W.shape for W in random] == [(40, 16), (40, 16), (80, 16)]
    np.testing.assert_allclose(np.linalg.norm(random[2], axis=1), 1.0, rtol=1e-5)
    chance = metrics.stability_chance([40, 40, 80], 16, seed=3, hungarian=True)
    assert chance["stability"] == pytest.approx(metrics.stability(random)["mean"], rel=1e-6)
    assert chance["hungarian_stability"] == pytest.approx(metrics.hungarian_stability(random)["mean"], rel=1e-6)
    assert metrics.stability_chance([40, 40, 80], 16, seed=3) == {"stability": chance["stability"]}  # seeded


def test_chance_grows_with_the_features_searched():
    """Why stability must be read against chance: an ensemble of 8x the features matches random
    vectors better (the study's shapes, d = 576: 0.148 for one SAE, 0.169 for J = 8, 4 runs)."""
    single = metrics.stability_chance([1152] * 4, 576)["stability"]
    ensemble = metrics.stability_chance([9216] * 4, 576)["stability"]
    assert single == pytest.approx(0.148, abs=0.003) and ensemble == pytest.approx(0.169, abs=0.003)
    assert metrics.over_chance(0.3, 0.15) == pytest.approx(2.0) and np.isnan(metrics.over_chance(0.3, 0.0))


def test_saeens_stability_prints_chance_and_ratio(tmp_path, capsys):
    assert main(["synthetic", "--out", str(tmp_path / "acts"), "--d-in", "8", "--features", "16", "--tokens", "2000"]) == 0
    runs = []
    for seed in ("0", "1"):
        runs.append(str(tmp_path / f"r{seed}"))
        assert main(["train", "--activations", str(tmp_path / "acts"), "--out", runs[-1], "--method", "bagging",
                     "--members", "2", "--arch", "topk", "--k", "2", "--width", "8", "--seed", seed, "--tokens", "1280",
                     "--batch-size", "128", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["stability", *runs, "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    s = json.loads((tmp_path / "s.json").read_text())
    for name in ("stability", "hungarian_stability"):
        assert s[f"{name}_chance"] == pytest.approx(
            metrics.stability_chance([16, 16], 8, hungarian=True)[name], rel=1e-6)
        assert s[f"{name}_over_chance"] == pytest.approx(s[name] / s[f"{name}_chance"], rel=1e-6)
        assert f"{name}_chance" in printed and f"{name}_over_chance" in printed
