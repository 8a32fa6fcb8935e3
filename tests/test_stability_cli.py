"""`saeens stability`: refuses comparisons that are not seed-only, clips the t interval, writes valid JSON."""

import json

import pytest

from saeens.cli import main

TINY = ["--tokens", "1280", "--batch-size", "128", "--lr", "3e-3", "--quiet"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("stab")
    for name, seed in (("acts", "0"), ("other", "1")):
        assert main(["synthetic", "--out", str(root / name), "--d-in", "8", "--features", "16", "--tokens", "2000",
                     "--seed", seed]) == 0
    return root


def _train(caches, name, *flags, acts="acts"):
    out = caches / "runs" / name
    if not out.exists():
        given = dict(zip(flags[::2], flags[1::2]))
        chosen = {"--method": "bagging", "--members": "2", "--arch": "topk", "--width": "8", "--seed": "0", **given}
        if chosen["--arch"] == "topk":
            chosen["--k"] = "2"
        argv = [a for k, v in chosen.items() for a in (k, v)]
        assert main(["train", "--activations", str(caches / acts), "--out", str(out), *argv, *TINY]) == 0
    return str(out)


def _refused(capsys, runs, *words):
    capsys.readouterr()
    assert main(["stability", *runs]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saeens: error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


def test_two_runs_clip_the_interval_and_write_null_for_nan(caches, tmp_path, capsys):
    runs = [_train(caches, "s0"), _train(caches, "s1", "--seed", "1")]
    out = tmp_path / "s.json"
    assert main(["stability", *runs, "--json", str(out)]) == 0
    s = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} is not valid JSON"))
    assert 0 <= s["stability_ci_low"] <= s["stability"] <= s["stability_ci_high"] <= 1
    assert s["hungarian_stability_ci_low"] is None and s["hungarian_stability_ci_high"] is None  # one pair
    assert "1 degree(s) of freedom" in s["ci_note"] and "no interval" in s["ci_note"]
    assert s["seeds"] == [0, 1] and s["method"] == "bagging"
    assert "note:" in capsys.readouterr().out


def test_three_runs_give_a_proper_interval(caches):
    from saeens.evals.stability import stability_of_runs

    s = stability_of_runs([_train(caches, "s0"), _train(caches, "s1", "--seed", "1"), _train(caches, "s2", "--seed", "2")])
    for name in ("stability", "hungarian_stability"):
        assert s[f"{name}_ci_low"] <= s[name] <= s[f"{name}_ci_high"], name
    assert len(s["stability_scores"]) == 3 and len(s["hungarian_stability_scores"]) == 3


def test_bounded_ci_keeps_an_interval_inside_the_range():
    from saeens.evals.stability import bounded_ci

    assert bounded_ci("stability", 0.2, 0.4, 4) == (0.2, 0.4, None)
    low, high, note = bounded_ci("stability", -0.416, 2.128, 2)  # two runs of the report
    assert (low, high) == (0.0, 1.0) and "[-0.416, 2.128]" in note and "clipped to [0, 1]" in note
    low, high, note = bounded_ci("hungarian_stability", -1.5, 0.5, 3)
    assert (low, high) == (-1.0, 0.5) and "clipped to [-1, 1]" in note


def test_refuses_what_is_not_a_seed_only_comparison(caches, capsys):
    s0, s1 = _train(caches, "s0"), _train(caches, "s1", "--seed", "1")
    _refused(capsys, [s0], "at least two runs")
    _refused(capsys, [s0, s0], "given twice")
    _refused(capsys, [s0, s0 + "/."], "given twice")
    _refused(capsys, [s0, _train(caches, "s0again", "--lr", "1e-3")], "both trained with seed 0")
    _refused(capsys, [s0, _train(caches, "boost", "--method", "boosting", "--seed", "3")], "method bagging", "boosting")
    _refused(capsys, [s0, _train(caches, "relu", "--arch", "relu", "--seed", "4")], "arch topk", "relu")
    _refused(capsys, [s0, _train(caches, "wide", "--width", "12", "--seed", "5")], "width 8", "width 12")
    _refused(capsys, [s1, _train(caches, "three", "--members", "3", "--seed", "6")], "members 2", "members 3")
    _refused(capsys, [s0, _train(caches, "elsewhere", "--seed", "7", acts="other")], "same activation cache")
