"""Reliability: SIGKILL mid-run (often mid-checkpoint) then resume == uninterrupted; determinism."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from saeens.cli import main

ARGS = ["--method", "bagging", "--members", "2", "--arch", "topk", "--width", "32", "--k", "4", "--tokens", "40960",
        "--batch-size", "256", "--lr", "3e-3", "--quiet"]


def _saeens(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saeens", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def _params(run: Path) -> dict[str, np.ndarray]:
    return load_file(str(run / "ensemble.safetensors"))


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    out = tmp_path_factory.mktemp("f") / "acts"
    assert main(["synthetic", "--out", str(out), "--d-in", "16", "--features", "64", "--tokens", "6000"]) == 0
    return out


def _checkpoint_steps(run: Path) -> list[int]:
    d = run / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_sigkill_then_resume_equals_uninterrupted_and_runs_are_bit_identical(acts, tmp_path):
    train = ["train", "--activations", str(acts), *ARGS]
    ref = tmp_path / "ref"
    p = _saeens(*train, "--out", str(ref), "--checkpoint-every", "40")
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    again = tmp_path / "again"  # determinism: the same command twice gives the same bits
    p = _saeens(*train, "--out", str(again), "--checkpoint-every", "40")
    assert p.wait(timeout=300) == 0
    for k, v in _params(ref).items():
        np.testing.assert_array_equal(_params(again)[k], v, err_msg=k)
    assert (ref / "metrics.jsonl").read_text() == (again / "metrics.jsonl").read_text()

    cut = tmp_path / "cut"
    rng = random.Random(0)
    kills = 0
    for attempt in range(3):  # checkpoint every step, so kills often land mid-write
        p = _saeens(*train, "--out", str(cut), "--checkpoint-every", "1")
        seen = _checkpoint_steps(cut)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None and _checkpoint_steps(cut) == seen:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(timeout=60)
        assert not (cut / "ensemble.json").exists() or p.returncode == 0
    assert kills >= 1
    p = _saeens(*train, "--out", str(cut), "--checkpoint-every", "1")
    assert p.wait(timeout=300) == 0, p.stderr.read().decode()
    for k, v in _params(ref).items():
        np.testing.assert_array_equal(_params(cut)[k], v, err_msg=k)


def test_evaluate_is_deterministic(acts, tmp_path):
    run = tmp_path / "r"
    assert main(["train", "--activations", str(acts), "--out", str(run), *ARGS[:-1], "--tokens", "5120", "--quiet"]) == 0
    outs = []
    for i in range(2):
        assert main(["evaluate", str(run), "--activations", str(acts), "--json", str(tmp_path / f"e{i}.json"), "--quiet"]) == 0
        outs.append(json.loads((tmp_path / f"e{i}.json").read_text()))
    assert outs[0] == outs[1]


def test_a_failed_attempt_leaves_no_run_behind(acts, tmp_path, capsys):
    """A mesh the batch does not split over fails at the first step: no config.json, no directory,
    and the next attempt trains from scratch without claiming to resume."""
    out = tmp_path / "r"
    argv = ["train", "--activations", str(acts), "--out", str(out), *ARGS[:-1], "--tokens", "1500", "--batch-size", "100"]
    assert main([*argv, "--mesh", "1x8", "--quiet"]) == 2  # 100 rows over 8 data shards
    assert "does not split" in capsys.readouterr().err
    assert not out.exists()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "resuming" not in err and (out / "config.json").is_file() and (out / "ensemble.json").is_file()
