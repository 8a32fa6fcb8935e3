"""The plots read at a glance: labelled panels, training MSE in activation units, honest log windows."""

import json

import numpy as np
import pytest

from saeens import plots
from saeens.cli import main


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions close after saving, kept for inspection."""
    kept = []
    monkeypatch.setattr(plots.plt, "close", kept.append)
    return kept


@pytest.fixture(scope="module")
def scaled_runs(tmp_path_factory):
    """A bagging and a boosting run on activations 50x larger than the training scale."""
    root = tmp_path_factory.mktemp("plots")
    rng = np.random.default_rng(0)
    np.save(root / "x.npy", (50 * rng.normal(size=(3000, 8)) * rng.uniform(0.5, 1.5, (3000, 1))).astype(np.float32))
    assert main(["cache", "--from-npy", str(root / "x.npy"), "--out", str(root / "acts")]) == 0
    runs = {}
    for method in ("bagging", "boosting"):
        runs[method] = root / method
        assert main(["train", "--activations", str(root / "acts"), "--out", str(runs[method]), "--method", method,
                     "--members", "2", "--width", "8", "--k", "2", "--tokens", "1280", "--batch-size", "128",
                     "--lr", "3e-3", "--quiet"]) == 0  # 10 steps per stage, a log row every 50 (and per stage)
    return root, runs


def test_grouped_bars_mark_each_bars_own_chance_level(tmp_path, figures):
    rows = [{"arch": "topk", "method": m, "stability": v, "stability_chance": c}
            for m, v, c in (("single", 0.6, 0.15), ("bagging", 0.7, 0.17))]
    plots.grouped_bars(rows, ["explained_variance", "stability"], tmp_path / "g.png", marks={"stability": "stability_chance"})
    ev, stab = figures[0].axes[:2]
    ticks = [c for c in stab.collections if c.get_label() == "stability chance"]
    assert [seg[0][1] for t in ticks for seg in t.get_segments()] == pytest.approx([0.15, 0.17])  # one per bar, its own
    assert [t.get_text() for t in stab.get_legend().get_texts()] == ["stability chance"]
    assert not [c for c in ev.collections if c.get_label() == "stability chance"]


def test_metric_bars_titles_say_what_and_which_way_is_better(tmp_path, figures):
    rows = [{"method": "single", "explained_variance": 0.5, "l0": 32, "delta_lm_loss": 0.4, "diversity": 900},
            {"method": "bagging", "explained_variance": 0.6, "l0": 128, "delta_lm_loss": 0.3, "diversity": 3000}]
    plots.metric_bars(rows, ["explained_variance", "l0", "delta_lm_loss", "diversity"], tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 0
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == [
        "Explained variance\n(higher is better)", "L0: active latents per token\n(lower is sparser)",
        "LM loss increase when spliced\n(lower is better)", "Diversity: features unlike all others\n(higher is better)"]
    assert all(ax.get_ylabel() for ax in axes)
    assert [t.get_text() for t in axes[0].texts] == ["0.5", "0.6"]  # values on the bars


def test_training_curves_are_in_activation_units_one_panel_per_method(scaled_runs, tmp_path, figures):
    root, runs = scaled_runs
    ref = {"bagging": 123.0}
    plots.training_curves(runs, tmp_path / "t.png", reference=ref)
    axes = figures[0].axes
    assert [ax.get_title() for ax in axes] == ["bagging", "boosting"]
    assert "activation units" in axes[0].get_ylabel() and "scaled" not in axes[0].get_ylabel()
    for ax, run in zip(axes, runs.values()):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        scale = json.loads((run / "ensemble.json").read_text())["input_scale"]
        assert scale < 0.1  # the activations are ~50x the training scale
        stairs = ax.patches[0]  # one segment per log window, exactly over its steps
        values, edges = stairs.get_data().values, stairs.get_data().edges
        np.testing.assert_allclose(values, [r["mse"] / scale**2 for r in rows], rtol=1e-6)
        np.testing.assert_array_equal(edges, [0] + [r["step"] for r in rows])
    boundaries = [line.get_xdata()[0] for line in axes[1].lines if line.get_linestyle() == "--"]
    assert boundaries == [10]  # boosting: one boundary between its 2 stages of 10 steps
    assert [line.get_ydata()[0] for line in axes[0].lines if line.get_linestyle() == ":"] == [123.0]


def test_training_mse_matches_the_evaluated_mse_in_its_unit(scaled_runs, tmp_path, figures):
    """The last training window and `saeens evaluate`'s mse (train split) are the same quantity."""
    root, runs = scaled_runs
    out = tmp_path / "e.json"
    assert main(["evaluate", str(runs["bagging"]), "--activations", str(root / "acts"), "--split", "train",
                 "--json", str(out), "--quiet"]) == 0
    evaluated = json.loads(out.read_text())["mse"]
    plots.training_curves({"bagging": runs["bagging"]}, tmp_path / "t.png")
    trained = figures[0].axes[0].patches[0].get_data().values[-1]
    assert 0.5 < trained / evaluated < 2, (trained, evaluated)


def test_curves_with_bands_draw_a_curves_chance_level_beside_it(tmp_path, figures):
    """A curve that carries its chance level (stability) gets it dashed in its colour, in its panel's
    legend; a curve without one gets none."""
    x = [1, 2, 3]
    series = {m: {"stability": {"x": x, "mean": v, "ci_low": v, "ci_high": v, "chance": [0.14, 0.15, 0.16]},
                  "explained_variance": {"x": x, "mean": [0.6, 0.7, 0.8]}}
              for m, v in (("bagging", [0.6, 0.65, 0.7]), ("boosting", [0.6, 0.4, 0.3]))}
    plots.curves_with_bands(series, ["explained_variance", "stability"], tmp_path / "c.png")
    ev, stab = figures[0].axes[:2]
    dashed = {ln.get_label(): ln for ln in stab.get_lines() if ln.get_linestyle() == "--"}
    assert sorted(dashed) == ["bagging chance", "boosting chance"]
    assert list(dashed["boosting chance"].get_ydata()) == pytest.approx([0.14, 0.15, 0.16])
    assert dashed["bagging chance"].get_color() == next(ln for ln in stab.get_lines() if ln.get_label() == "bagging").get_color()
    assert "bagging chance" in [t.get_text() for t in stab.get_legend().get_texts()]
    assert not [ln for ln in ev.get_lines() if ln.get_linestyle() == "--"]
