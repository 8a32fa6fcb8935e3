"""benchmarks/pipeline.py at toy size: host vs step, and bagging and boosting through the CLI at
two budgets, each with its member-tokens/s and the ratio."""

import dataclasses

import pytest

from benchmarks import pipeline


def test_pipeline_reports_each_budget():
    sizes = dataclasses.replace(pipeline.QUICK, rows=1024, members=2)
    r = pipeline.run(sizes, (1.0, 2.0))
    h = r["host_vs_step"]
    assert h["host_s_per_step"] > 0 and h["step_s"] > 0 and h["fit_tokens_per_s_prefetch_on"] > 0
    rp = r["residual_pass"]  # the rows stage 1 of 2 reads (about an epoch), d float32 each
    assert 0.9 * rp["train_rows"] <= rp["rows"] <= rp["train_rows"]
    assert rp["bytes_written"] == rp["rows"] * sizes.d * 4 and rp["link_us_per_row"] > 0 and rp["build_us_per_row"] > 0
    assert [b["epochs"] for b in r["train_cli"]] == [1.0, 2.0]
    for budget in r["train_cli"]:
        bag, boost = budget["rows"]
        assert (bag["method"], boost["method"]) == ("bagging", "boosting")
        assert bag["tokens_per_member"] == boost["tokens_per_member"] == int(sizes.rows * budget["epochs"]) // sizes.batch * sizes.batch
        assert budget["boosting_over_bagging"] == pytest.approx(boost["member_tokens_per_s"] / bag["member_tokens_per_s"])
        assert bag["command"].startswith("-m saeens train --activations TMP/acts --out TMP/bagging-")  # no machine path
    text = pipeline.format_report(r)
    assert "2 epoch(s): boosting / bagging member-tokens/s end to end" in text and "boosting residual pass" in text


@pytest.mark.parametrize("text", ["", "1,x", "0,4", "-1"])
def test_bad_epochs_is_one_line_error(text):
    with pytest.raises(SystemExit, match="--epochs"):
        pipeline.parse_epochs(text)
