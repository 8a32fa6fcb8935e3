"""python -m benchmarks.pipeline [--quick] [--epochs 1,4]: the input pipeline and boosting's cost, end to end.

1. host vs step: per step, the host's share (read batch `step` from an activation cache, check it,
   put it on the device) against the jitted step alone, and `fit` tokens/s with the prefetch on
   (batches read ahead on a thread) and off (read in the step's turn).
2. boosting vs bagging: `saeens train` through the CLI (a fresh process: data loading, checks,
   logging, checkpoints, each stage's residual pass) for bagging J and boosting J on the same
   cache and token budget per member, at each budget of --epochs; member-tokens/s = J * tokens /
   wall seconds. `python -m benchmarks` runs this too.
3. boosting's residual pass, per training row: one stage's forward alone (the link, on rows already
   on the device) against building stage 1's residual file from the cache (read, scale, link,
   write), so the pass's cost splits into compute and the file's reads and writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import loadavg
from saeens import train
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.data.cache import ActivationCache, cache_from_array
from saeens.data.source import CacheSource
from saeens.io.files import atomic_write_json
from saeens.synthetic import make_synthetic
from saeens.train import residual


@dataclasses.dataclass(frozen=True)
class PipelineSizes:
    d: int = 256
    m: int = 1024
    k: int = 32
    batch: int = 2048
    rows: int = 65536  # training rows in the cache
    epochs: float = 1.0  # passes over the cache per member / boosting stage (run() sets it per budget)
    members: int = 8


EPOCHS = (1.0, 4.0)  # the default budgets, in passes over the cache per member / stage
QUICK = PipelineSizes(d=32, m=128, k=8, batch=256, rows=4096, epochs=1.0, members=4)


def _cache(s: PipelineSizes, out: Path) -> ActivationCache:
    acts = make_synthetic(s.rows + s.rows // 9, s.d, 4 * s.d, active=8, seed=0).acts_ND
    return ActivationCache(cache_from_array(acts, out, test_fraction=0.1, shard_rows=16384))


def host_vs_step(s: PipelineSizes, cache: ActivationCache, out: Path, steps: int = 20) -> dict:
    """Mean host seconds per batch (read + check + device_put), mean jitted-step seconds, and fit's
    tokens/s with and without the prefetch (single TopK SAE)."""
    run = RunConfig(SAEConfig(d_in=s.d, width=s.m, k=s.k, dead_tokens=10**9),
                    TrainConfig(n_tokens=s.batch * steps, batch_size=s.batch, checkpoint_every=0), EnsembleConfig("single", 1))
    src = CacheSource(cache)
    t = time.perf_counter()
    batches = [jax.device_put(src.batch(i, s.batch, 0)).block_until_ready() for i in range(steps)]
    host_s = (time.perf_counter() - t) / steps
    method = train.build_method(run)
    state = method.init(jax.random.key(0), jax.numpy.asarray(src.init_sample(4096, 0)))
    state, _ = method.step(state, batches[0], jax.random.key(0))  # compile
    jax.block_until_ready(state)
    t = time.perf_counter()
    for i, x in enumerate(batches):
        state, _ = method.step(state, x, jax.random.key(i))
    jax.block_until_ready(state)
    step_s = (time.perf_counter() - t) / steps
    fit_s = {}
    for depth in (0, 2):
        train.fit(out / f"warm{depth}", run, cache, progress=False, prefetch=depth)  # compiled once per process
        t = time.perf_counter()
        train.fit(out / f"fit{depth}", run, cache, progress=False, prefetch=depth)
        fit_s[depth] = time.perf_counter() - t
    tokens = steps * s.batch
    return {"host_s_per_step": host_s, "step_s": step_s, "host_over_step": host_s / step_s,
            "fit_tokens_per_s_prefetch_off": tokens / fit_s[0], "fit_tokens_per_s_prefetch_on": tokens / fit_s[2]}


def residual_pass(s: PipelineSizes, cache: ActivationCache, out: Path) -> dict:
    """Microseconds per training row of boosting's residual pass: the whole build of stage 1's file,
    and the link alone (the compiled stage forward over as many CHUNK_ROWS-row chunks, no host
    work). The build's fixed costs (the digest, the marker) count in it: small beside a real cache."""
    run = RunConfig(SAEConfig(d_in=s.d, width=s.m, k=s.k, dead_tokens=10**9),
                    TrainConfig(n_tokens=s.rows // s.batch * s.batch, batch_size=s.batch, checkpoint_every=0),
                    EnsembleConfig("boosting", 2))
    src = CacheSource(cache)
    state = train.build_method(run, residual_cache=True).init(jax.random.key(0), jnp.asarray(src.init_sample(4096, 0)))
    link, stage0 = residual._link(run.sae), jax.tree.map(lambda a: a[0], state.params)
    chunk = jnp.asarray(src.rows(np.arange(residual.CHUNK_ROWS) % src.n_train))
    jax.block_until_ready(link(stage0, chunk))  # compiled once: the build below reuses the program
    out.mkdir(parents=True)
    t = time.perf_counter()
    built = residual.stage_source(out, src, state, run.sae, run.train, 1, 2)
    build_s = time.perf_counter() - t
    n_rows = len(built.rows_U)
    t = time.perf_counter()
    for _ in range(-(-n_rows // residual.CHUNK_ROWS)):  # the build's chunks, its last one padded as there
        r = link(stage0, chunk)
    jax.block_until_ready(r)
    link_s = time.perf_counter() - t
    return {"rows": n_rows, "train_rows": src.n_train, "bytes_written": int(built.r_UD.nbytes),
            "link_us_per_row": 1e6 * link_s / n_rows, "build_us_per_row": 1e6 * build_s / n_rows,
            "link_share_of_build": link_s / build_s}


def train_cli(s: PipelineSizes, cache: Path, out: Path, method: str) -> dict:
    """One `saeens train` in a fresh process; its wall time and the loop's own seconds."""
    tokens = int(s.rows * s.epochs) // s.batch * s.batch
    cmd = [sys.executable, "-m", "saeens", "train", "--activations", str(cache), "--out", str(out), "--method", method,
           "--members", str(s.members), "--width", str(s.m), "--k", str(s.k), "--tokens", str(tokens),
           "--batch-size", str(s.batch), "--checkpoint-every", "0", "--quiet"]
    load = loadavg()
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t
    loop_s = json.loads((out / "ensemble.json").read_text())["train_seconds_last_session"]
    member_tokens = s.members * tokens
    return {"method": method, "J": s.members, "tokens_per_member": tokens, "wall_s": wall, "loop_s": loop_s,
            "member_tokens_per_s": member_tokens / wall, "member_tokens_per_s_loop": member_tokens / loop_s,
            "loadavg_before": load,
            # the temporary directory is this machine's: the record names it TMP
            "command": " ".join(cmd[1:]).replace(str(out.parent), "TMP")}


def run(s: PipelineSizes, epochs: tuple[float, ...] = EPOCHS) -> dict:
    """host vs step, then bagging and boosting through the CLI at each budget (passes over the
    cache per member / stage: each boosting stage after the first adds one residual pass)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = _cache(s, tmp / "acts")
        report = {"sizes": dataclasses.asdict(s), "host_vs_step": host_vs_step(s, cache, tmp / "fits"),
                  "residual_pass": residual_pass(s, cache, tmp / "residual"), "train_cli": []}
        for e in epochs:
            se = dataclasses.replace(s, epochs=e)
            rows = [train_cli(se, cache.path, tmp / f"{method}-{e}", method) for method in ("bagging", "boosting")]
            report["train_cli"].append({"epochs": e, "rows": rows,
                                        "boosting_over_bagging": rows[1]["member_tokens_per_s"] / rows[0]["member_tokens_per_s"]})
    return report


def format_report(r: dict) -> str:
    h = r["host_vs_step"]
    lines = [f"sizes {r['sizes']}",
             f"host per step {1e3 * h['host_s_per_step']:.1f} ms (read + check + device_put), step {1e3 * h['step_s']:.1f} ms "
             f"(host/step {h['host_over_step']:.2f}); fit {h['fit_tokens_per_s_prefetch_off']:.0f} tok/s prefetch off, "
             f"{h['fit_tokens_per_s_prefetch_on']:.0f} tok/s prefetch on"]
    rp = r["residual_pass"]
    lines.append(f"boosting residual pass: {rp['build_us_per_row']:.1f} us per row ({rp['rows']} rows, "
                 f"{rp['bytes_written'] / 1e6:.0f} MB written), of which the stage forward {rp['link_us_per_row']:.1f} us "
                 f"({rp['link_share_of_build']:.0%}); the rest reads, checks and writes rows")
    for budget in r["train_cli"]:
        for row in budget["rows"]:
            lines.append(f"{budget['epochs']:g} epoch(s): saeens train --method {row['method']:<8} J={row['J']}: "
                         f"{row['wall_s']:.1f} s wall, {row['member_tokens_per_s']:.0f} member-tok/s end to end "
                         f"({row['member_tokens_per_s_loop']:.0f} in the loop), load {row['loadavg_before'][0]:.1f}")
        lines.append(f"{budget['epochs']:g} epoch(s): boosting / bagging member-tokens/s end to end: "
                     f"{budget['boosting_over_bagging']:.2f}")
    return "\n".join(lines)


def parse_epochs(text: str) -> tuple[float, ...]:
    try:
        epochs = tuple(float(e) for e in text.split(",") if e)
    except ValueError:
        raise SystemExit(f"--epochs {text!r}: give numbers separated by commas, e.g. 1,4") from None
    if not epochs or min(epochs) <= 0:
        raise SystemExit(f"--epochs {text!r}: give positive numbers separated by commas, e.g. 1,4")
    return epochs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--json", type=Path, help="write the measurements to this JSON file")
    ap.add_argument("--epochs", default=",".join(f"{e:g}" for e in EPOCHS), help="budgets, comma separated: tokens per member (boosting: per stage) "
                    "in passes over the cache (each boosting stage after the first makes one residual pass, so more "
                    "epochs amortise it)")
    args = ap.parse_args(argv)
    report = run(QUICK if args.quick else PipelineSizes(), parse_epochs(args.epochs))
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
