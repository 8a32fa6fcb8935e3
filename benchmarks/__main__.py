"""python -m benchmarks [--quick] [--json OUT]: every case, readable tables, optional JSON.

Single-SAE steps (dense and sparse TopK/BatchTopK, with and without dead latents; dense ReLU and
JumpReLU), the bagging J-ratio, memory per member, our sparse TopK step side by side with EleutherAI
sparsify's (benchmarks/peer.py; skipped with a line when sparsify is not installed), then the input
pipeline's host time per step vs step time and boosting vs bagging J = 8 end to end through `saeens
train` (benchmarks/pipeline.py). Defaults d=576, m=4608, k=32, batch 4096 (minutes on a 2-core CPU;
--quick is a smoke run). Rates use the minimum time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax

from benchmarks import pipeline
from benchmarks.harness import QUICK, Sizes, bagging_case, loadavg, matmul_time, single_case
from benchmarks.peer import side_by_side


def _fmt_table(rows: list[dict]) -> str:
    head = ["case", "kernel", "ms/step", "tok/s", "member-tok/s", "GFLOP/s(model)", "x matmul", "enc-bound", "vmap/seq", "MB/member", "load"]
    lines = [head]
    for r in rows:
        lines.append([
            r["case"], r["kernel"], f"{1e3 * r['min_s']:.0f}", f"{r['tokens_per_s']:.0f}",
            f"{r['member_tokens_per_s']:.0f}", f"{r['achieved_flops_per_s'] / 1e9:.1f}",
            f"{r['ratio_to_matmul_rate']:.2f}", f"{r['fraction_of_encoder_bound']:.2f}",
            f"{r['vmap_over_sequential']:.2f}" if "vmap_over_sequential" in r else "",
            f"{r['state_bytes_per_member'] / 2**20:.1f}", f"{r['loadavg_before'][0]:.1f}",
        ])
    return _columns(lines)


def _columns(lines: list[list[str]]) -> str:
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(lines[0]))]
    out = [" | ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in lines]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt_peer(rows: list[dict]) -> str:
    head = ["case", "threads", "ours ms", "sparsify ms", "ours tok/s", "sparsify tok/s", "speedup", "ours enc-bound",
            "sparsify enc-bound", "load"]
    lines = [head] + [[
        r["case"], str(r["threads"]), f"{1e3 * r['ours']['min_s']:.0f}", f"{1e3 * r['sparsify']['min_s']:.0f}",
        f"{r['ours_tokens_per_s']:.0f}", f"{r['sparsify_tokens_per_s']:.0f}", f"{r['speedup_over_sparsify']:.2f}x",
        f"{r['ours_fraction_of_encoder_bound']:.2f}", f"{r['sparsify_fraction_of_encoder_bound']:.2f}",
        f"{r['loadavg_before'][0]:.1f}",
    ] for r in rows]
    return _columns(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    ap.add_argument("--json", type=Path, help="write every measurement to this JSON file")
    ap.add_argument("--d", type=int)
    ap.add_argument("--m", type=int)
    ap.add_argument("--k", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--members", default="1,2,4,8", help="bagging J values (comma separated; '' to skip)")
    ap.add_argument("--kernels", default="dense,sparse", help="kernels for the single-SAE cases")
    ap.add_argument("--bagging-kernels", default="sparse", help="kernels for the bagging table (dense: minutes)")
    ap.add_argument("--no-peer", action="store_true", help="skip the side-by-side with sparsify")
    ap.add_argument("--dead", type=int, default=None, help="dead latents at the start of the AuxK case (default m/20)")
    ap.add_argument("--pipeline-epochs", default=",".join(f"{e:g}" for e in pipeline.EPOCHS), help="budgets of the boosting-vs-bagging runs, in passes "
                    "over the cache ('' skips benchmarks/pipeline.py)")
    args = ap.parse_args(argv)
    pipeline_epochs = pipeline.parse_epochs(args.pipeline_epochs) if args.pipeline_epochs else ()

    base = QUICK if args.quick else Sizes()
    s = Sizes(**{f: (getattr(args, f) if getattr(args, f) is not None else getattr(base, f))
                 for f in ("d", "m", "k", "batch", "repeats")}, warmup=base.warmup)
    n_dead = args.dead if args.dead is not None else s.m // 20
    kernels_ = [k for k in args.kernels.split(",") if k]
    bag_kernels = [k for k in args.bagging_kernels.split(",") if k]
    members = [int(j) for j in args.members.split(",") if j]

    report = {
        "sizes": s.__dict__,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "jax": jax.__version__,
                    "devices": [str(d) for d in jax.devices()], "cpu_count": os.cpu_count(),
                    "loadavg_start": loadavg(), "xla_flags": os.environ.get("XLA_FLAGS", "")},
        "data": "a fixed random batch (normal rows + a common offset), reused every step",
        "flop_model": "see benchmarks/harness.py: dense 18*B*d*m for TopK/BatchTopK (12 main + 6 AuxK, always "
                      "computed), 12*B*d*m for ReLU/JumpReLU; "
                      "sparse 2*B*d*m + 8*B*k*d (+ 10*B*d*256 per block of 256 dead latents)",
        "cases": [],
        "bagging": [],
        "sparsify": [],
        "pipeline": None,
    }
    t_start = time.time()
    print(f"sizes {s}, load {loadavg()}", flush=True)
    print(f"matmul [B,d]x[d,m]: {matmul_time(s) * 1e3:.1f} ms", flush=True)
    plan = [(arch, kern, 0) for arch in ("topk", "batchtopk") for kern in kernels_]
    plan += [("topk", kern, n_dead) for kern in kernels_]
    plan += [(arch, "dense", 0) for arch in ("relu", "jumprelu") if "dense" in kernels_]  # no sparse kernel
    for arch, kern, nd in plan:
        row = single_case(s, arch, kern, nd)
        report["cases"].append(row)
        print(f"  {row['case']:<22} {kern:<6} {row['min_s'] * 1e3:8.1f} ms  {row['tokens_per_s']:9.0f} tok/s  "
              f"enc-bound {row['fraction_of_encoder_bound']:.2f}  load {row['loadavg_before'][0]}", flush=True)
    for kern in bag_kernels:
        for J in members:
            row = bagging_case(s, kern, J)
            report["bagging"].append(row)
            print(f"  {row['case']:<22} {kern:<6} {row['min_s'] * 1e3:8.1f} ms  {row['member_tokens_per_s']:9.0f} "
                  f"member-tok/s  vmap/seq {row['vmap_over_sequential']:.2f}  load {row['loadavg_before'][0]}", flush=True)
    for nd in ([] if args.no_peer else [0, n_dead]):
        row = side_by_side(s, nd)
        if row is None:
            print("sparsify is not installed (pip install eai-sparsify): the side-by-side is skipped", flush=True)
            break
        report["sparsify"].append(row)
        print(f"  {row['case']:<22} ours {row['ours']['min_s'] * 1e3:7.1f} ms  sparsify {row['sparsify']['min_s'] * 1e3:7.1f} ms"
              f"  speedup {row['speedup_over_sparsify']:.2f}x (CPU time {row['speedup_over_sparsify_cpu_time']:.2f}x)"
              f"  load {row['loadavg_before'][0]}", flush=True)
    if pipeline_epochs:
        report["pipeline"] = pipeline.run(pipeline.QUICK if args.quick else pipeline.PipelineSizes(), pipeline_epochs)
    report["machine"]["loadavg_end"] = loadavg()
    report["wall_s"] = time.time() - t_start
    print()
    print(_fmt_table(report["cases"] + report["bagging"]))
    if report["sparsify"]:
        print()
        print(_fmt_peer(report["sparsify"]))
    if report["pipeline"]:
        print()
        print(pipeline.format_report(report["pipeline"]))
    print("\nenc-bound: fraction of the encoder-matmul bound (1.0 = the step costs one [B,d]x[d,m] matmul); "
          "x matmul: model FLOP/s over the matmul FLOP/s measured right before the case; "
          "vmap/seq: member-tokens/s of one compiled bagging step over J single steps in sequence; "
          "speedup: sparsify's step time over ours, paired (alternating steps, minimum of each).")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
