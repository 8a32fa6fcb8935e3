"""Memory over a long training run: peak and current RSS early and at the end.

Writes a large synthetic activation cache shard by shard (never whole in memory), trains ONE
bagging run for many steps from it (paused and resumed in-process, so nothing recompiles), and
samples /proc/self/status (VmHWM = peak RSS, RssAnon = heap, RssFile = pages of the memory-mapped
shards, bounded by the cache size and reclaimable) after the first steps and at every fifth of the run.
Flat memory means the later figures are about the early ones. Usage:
    python -m benchmarks.train_memory [--rows 1000000] [--d-in 256] [--steps 2000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def proc_status() -> dict[str, float]:
    """VmRSS, VmHWM, RssAnon, RssFile in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(val.split()[0]) / 1024
    return out


def write_cache(out: Path, rows: int, d_in: int, shard_rows: int = 65536) -> None:
    from saeens.data.cache import CacheWriter

    rng = np.random.default_rng(0)
    writer = CacheWriter(out, d_in, {"model": "synthetic-benchmark"}, shard_rows)
    for lo in range(0, rows, shard_rows):
        n = min(shard_rows, rows - lo)
        writer.add(rng.standard_normal((n, d_in), np.float32), np.full(n, -1, np.int32), "train")
    writer.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--d-in", type=int, default=256)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--members", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--early", type=int, default=100, help="steps after which the early sample is taken")
    ap.add_argument("--json")
    args = ap.parse_args()

    from saeens import train
    from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
    from saeens.data.cache import ActivationCache

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        write_cache(Path(tmp) / "acts", args.rows, args.d_in)
        cache_s = time.perf_counter() - t0
        acts = ActivationCache(Path(tmp) / "acts")
        after_cache = proc_status()

        cfg = RunConfig(
            SAEConfig(d_in=args.d_in, width=args.width, arch="topk", k=32),
            TrainConfig(n_tokens=args.steps * args.batch_size, batch_size=args.batch_size, checkpoint_every=500,
                        log_every=100),
            EnsembleConfig("bagging", args.members),
        )
        samples, done = {}, 0
        t = time.perf_counter()
        for upto in sorted({args.early, *range(args.steps // 5, args.steps + 1, args.steps // 5)}):  # ONE run, paused and resumed in-process
            train.fit(Path(tmp) / "run", cfg, acts, progress=False, stop_after=upto - done)
            done = upto
            samples[f"after_{upto}_steps_mb"] = proc_status()
        train_s = time.perf_counter() - t
    result = {
        "rows": args.rows, "d_in": args.d_in, "cache_gb": args.rows * args.d_in * 4 / 1e9, "steps": args.steps,
        "batch_size": args.batch_size, "members": args.members, "width": args.width,
        "tokens_seen": args.steps * args.batch_size, "epochs": args.steps * args.batch_size / args.rows,
        "after_cache_write_mb": after_cache, **samples,
        "seconds": {"cache_write": cache_s, "train": train_s}, "loadavg": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
