"""benchmarks/accelerator.py at toy size on the CPU: one row per shape x dtype x method with
positive rates, peak FLOP/s by device kind, and 'unknown' (never a made-up figure) for a CPU."""

import json

import pytest

from benchmarks import accelerator


def test_toy_run_prints_every_case_and_writes_json(tmp_path, capsys):
    out = tmp_path / "accel.json"
    argv = ["--toy", "--members", "2", "--repeats", "1", "--shapes", "pythia-160m", "--json", str(out)]
    assert accelerator.main(argv) == 0
    text = capsys.readouterr().out
    assert "peak FLOP/s unknown for device kind 'cpu'" in text
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["dtype"], r["method"]) for r in rows] == [(d, m) for d in accelerator.DTYPES for m in accelerator.METHODS]
    assert [r["members"] for r in rows[:3]] == [1, 2, 2]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["model_flops_per_s"] > 0 and r["fraction_of_peak"] is None
        assert r["member_tokens_per_s"] == pytest.approx(r["tokens_per_s"] * (2 if r["method"] == "bagging" else 1))
    assert sum(line.startswith("pythia-160m (toy)") and line.rstrip().endswith("unknown") for line in text.splitlines()) == 6


def test_peak_table_and_flop_model():
    assert accelerator.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == pytest.approx(989.4e12)
    assert accelerator.peak_flops("TPU v5p", "float32") == pytest.approx(459e12)  # not v5 lite's
    assert accelerator.peak_flops("TPU v5 lite", "bfloat16") == pytest.approx(197e12)
    assert accelerator.peak_flops("cpu", "float32") is None
    topk, jump = accelerator.SHAPES
    assert accelerator.flops_per_token(topk) == 2 * 768 * 16384 + 8 * 128 * 768
    assert accelerator.flops_per_token(jump, frozen_stages=3.5) == 12 * 2304 * 16384 + 3.5 * 4 * 2304 * 16384
