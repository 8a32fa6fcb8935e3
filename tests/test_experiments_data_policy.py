"""experiments/data_policy.py on a synthetic cache with massive rows: the policy-off runs train and
are scored on every row, the policy-on runs on the kept rows only, and the flagged rows are what
turns the per-dimension EV around (the table and the drivers say so)."""

import dataclasses

import numpy as np
import pytest

from experiments import common, data_policy
from saeens.data.cache import ActivationCache, cache_from_array


@pytest.fixture
def cache(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2200, 8)).astype(np.float32)
    x[[5, 700, 2150], 3] = 4000.0  # two training rows and one test row of a massive dimension
    return ActivationCache(cache_from_array(x, tmp_path / "acts", test_fraction=0.1))


def test_all_rows_ignore_the_flags_and_kept_rows_skip_them(cache):
    from saeens.data.outliers import kept_view

    assert cache.meta["outliers"]["splits"]["train"]["flagged"] == 2 and cache.meta["outliers"]["splits"]["test"]["flagged"] == 1
    rows = data_policy.AllRows(cache)
    assert rows.n_rows("train") == 1980 and kept_view(cache).n_rows("train") == 1978
    assert sum(len(c) for c in rows.chunks("test")) == 220 and sum(len(c) for c in kept_view(cache).chunks("test")) == 219
    assert kept_view(rows) is rows  # nothing re-applies the flags


def test_main_writes_both_policies_scored_both_ways(cache, tmp_path, monkeypatch):
    monkeypatch.setattr(common, "WORK", tmp_path / "work")
    monkeypatch.setattr(common, "get_cache", lambda scale, progress=True: cache)
    monkeypatch.setattr(common, "hook", lambda: "toy")
    monkeypatch.setattr(data_policy, "SEEDS", (0, 1))
    scale = dataclasses.replace(common.SCALES["tiny"], width=16, k=4, members=2, batch_size=64, train_tokens=64 * 12,
                                other_train_tokens=64 * 12, checkpoint_every=0, dead_tokens=512)
    result = data_policy.main(scale, progress=False)
    assert {(r["arch"], r["method"], r["trained_on"], r["scored_on"]) for r in result["rows"]} == {
        (a, m, t, s) for a in ("topk", "relu") for m in ("single", "expanded") for t in ("kept", "all") for s in ("kept", "all")}
    assert result["flagged_rows"] == {"train": 2, "test": 1}
    by = {(r["arch"], r["method"], r["trained_on"], r["scored_on"]): r for r in result["rows"]}
    for arch in ("topk", "relu"):
        # scored on every test row, the massive row's error lands in dimensions of small variance: their
        # EVs sink the per-dimension mean while the pooled EV does not follow, and the drivers show it
        run = result["runs"][f"{arch}/single/kept/all"][0]
        top = run["ev_drivers"][0]
        assert top["explained_variance"] < -100 and top["variance_share"] < 0.01 and top["shortfall_share"] > 0.2
        assert run["explained_variance"] < -100 < run["explained_variance_pooled"]
        assert by[(arch, "single", "kept", "all")]["mse"]["mean"] > 10 * by[(arch, "single", "kept", "kept")]["mse"]["mean"]
        assert result["runs"][f"{arch}/single/kept/kept"][0]["n_tokens"] == 219
        assert result["runs"][f"{arch}/single/all/all"][0]["n_tokens"] == 220
    text = (common.results_dir(scale) / "data_policy.md").read_text()
    assert "trained on all rows, scored on kept" in text and "| trained on |" in text
    assert data_policy.main(scale, progress=False) is None  # done: skipped without --force
