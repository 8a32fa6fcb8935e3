"""Two processes on localhost (4 CPU devices each, gloo collectives) train ONE bagging ensemble.

Each process runs `python tests/test_multihost.py <process_id> <port> <out>` (the worker at the
bottom of this file): `saeens.sharding.initialize_distributed`, then `train.fit(..., mesh=...)`
over the 8 devices of both processes. Phase 1 trains 3 steps on a (4, 2) mesh (members split
across the processes; each process reads the full batch) and writes a multi-process orbax
checkpoint; phase 2 resumes it on a (1, 8) mesh (batch rows split across the processes; each
process reads only its half of every batch) to the end of the run. The result must equal a
single-process, unsharded run of the same 6 steps, and the run directory must hold the finished
run (config.json, ensemble.json, ensemble.safetensors: written by process 0 alone) that
`load_ensemble` reads back.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

J, D, M, B, STEPS = 4, 16, 32, 64, 6
TIMEOUT_S = 300  # normally ~30 s of work; a hung collective ends here


def _run():
    from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig

    return RunConfig(
        SAEConfig(d_in=D, width=M, arch="topk", k=4, dead_tokens=300),
        TrainConfig(n_tokens=B * STEPS, batch_size=B, lr=3e-3, checkpoint_every=3, geometric_median_samples=512),
        EnsembleConfig("bagging", J),
    )


def _acts():
    from saeens.data.cache import ArrayActivations
    from saeens.synthetic import make_synthetic

    return ArrayActivations(make_synthetic(3000, D, 48, active=3, seed=0).acts_ND)


class _CountingActs:
    """The activations, recording how many rows each gather reads."""

    def __init__(self, acts):
        self.acts, self.rows, self.d_in = acts, [], acts.d_in

    def n_rows(self, split="train"):
        return self.acts.n_rows(split)

    def gather(self, idx, split="train"):
        self.rows.append(len(idx))
        return self.acts.gather(idx, split)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_one_ensemble(tmp_path):
    from saeens import train
    from saeens.config import RunConfig

    port = _free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    procs = []
    with contextlib.ExitStack() as logs:
        try:
            for i in range(2):
                log = logs.enter_context(open(tmp_path / f"worker{i}.log", "w"))
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, str(i), str(port), str(tmp_path)],
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parent.parent,
                ))
            deadline = time.monotonic() + TIMEOUT_S
            while time.monotonic() < deadline and any(p.poll() is None for p in procs):
                if any(p.poll() not in (None, 0) for p in procs):
                    break  # one worker failed: its peer would wait for it until a timeout
                time.sleep(0.2)
        finally:  # never leave a worker behind (a dead peer would block the other one forever)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    tails = "\n".join(f"--- worker {i} (rc {p.returncode}):\n" + (tmp_path / f"worker{i}.log").read_text()[-3000:]
                      for i, p in enumerate(procs))
    assert all(p.returncode == 0 for p in procs), tails

    ref = train.fit(tmp_path / "single", _run(), _acts(), progress=False)
    for i in range(2):
        info = json.loads((tmp_path / f"info{i}.json").read_text())
        assert info["process_count"] == 2 and info["devices"] == 8 and info["local_devices"] == 4
        # (4,2): each process reads every batch row; (1,8): only its half of them (3 steps each,
        # read block by block)
        assert sum(info["rows_read"]["4x2"]) == 3 * B
        assert sum(info["rows_read"]["1x8"]) == 3 * B // 2
        assert info["process_rows_1x8"] == list(range(i * B // 2, (i + 1) * B // 2))
        got = np.load(tmp_path / f"params{i}.npz")
        for name, leaf in ref.params.items():
            np.testing.assert_allclose(got[name], np.asarray(leaf), rtol=1e-5, atol=1e-5, err_msg=f"process {i} {name}")
    run_dir = tmp_path / "shared_run"  # the finished run's files, as a later `saeens evaluate` reads them
    assert RunConfig.load(run_dir / "config.json") == _run()
    saved, meta = train.load_ensemble(run_dir)
    assert meta["method"] == "bagging" and meta["members"] == J
    for name, leaf in ref.params.items():
        np.testing.assert_allclose(np.asarray(saved.params[name]), np.asarray(leaf), rtol=1e-5, atol=1e-5, err_msg=name)


def worker(process_id: int, port: int, out: Path) -> None:
    from saeens import sharding as shd

    shd.initialize_distributed(f"localhost:{port}", 2, process_id, timeout_s=60)
    import jax

    from saeens import train

    run, acts = _run(), _acts()
    run_dir = out / "shared_run"  # one run directory, as a shared disk or bucket would be
    rows = {}
    counting = _CountingActs(acts)
    train.fit(run_dir, run, counting, progress=False, mesh=shd.make_mesh(4, 2), stop_after=3)
    rows["4x2"], counting.rows = counting.rows[1:], []  # [0] is the init sample, read in full
    mesh = shd.make_mesh(1, 8)
    ens = train.fit(run_dir, run, counting, progress=False, mesh=mesh)
    rows["1x8"] = counting.rows[1:]
    np.savez(out / f"params{process_id}.npz", **{k: np.asarray(v) for k, v in ens.params.items()})
    info = {"process_count": jax.process_count(), "devices": jax.device_count(),
            "local_devices": jax.local_device_count(), "rows_read": rows,
            "process_rows_1x8": shd.process_rows(mesh, B).tolist()}
    (out / f"info{process_id}.json").write_text(json.dumps(info))
    jax.distributed.shutdown()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
