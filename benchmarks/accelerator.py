"""python -m benchmarks.accelerator [--toy] [--json OUT]: training throughput on whatever device JAX sees.

Tokens/s of the library's own compiled steps (saeens.train.methods.build_method: single, bagging
J=8, boosting J=8) at the paper's shapes, in float32 and bfloat16 (SAEConfig.compute_dtype):
  pythia-160m   d=768,  m=16,384, TopK k=128 (sparse kernel)
  gemma-2-2b    d=2,304, m=16,384, JumpReLU
and the fraction of the device's peak FLOP/s (table PEAK_TFLOPS by device kind; an unknown kind
says so). --toy runs tiny shapes that a CPU finishes in seconds (what the test runs).

Timing: a fixed batch already on the device, the state donated as in training, the first call
(compile) and one warm-up call excluded, each timed call ended by block_until_ready; rates use the
minimum over the repeats. Boosting is timed at every stage (stage j re-runs the j frozen stages
in the step) and averaged, i.e. the mean step of a whole boosting run.

Model FLOPs per member-token (multiply-add = 2): sparse TopK 2dm + 8kd (encoder + the k kept
latents' decode and gradients); dense (JumpReLU) 12dm (encoder, decoder, four backward products);
boosting stage j adds j frozen stages' encode + decode, 4dm each. Optimizer and top-k not counted.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.harness import time_calls
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
from saeens.io.files import atomic_write_json
from saeens.train.methods import build_method


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    d: int
    m: int
    arch: str
    k: int = 32  # TopK only
    batch: int = 4096


SHAPES = (Shape("pythia-160m", 768, 16_384, "topk", k=128), Shape("gemma-2-2b", 2_304, 16_384, "jumprelu"))
TOY_SHAPES = (Shape("pythia-160m (toy)", 32, 256, "topk", k=8, batch=256), Shape("gemma-2-2b (toy)", 48, 256, "jumprelu", batch=256))
METHODS = ("single", "bagging", "boosting")
DTYPES = ("float32", "bfloat16")
# Dense peak TFLOP/s per chip from the vendors' datasheets (no structured sparsity). float32 is
# the rate XLA's default matmul precision runs float32 at: TF32 tensor cores on NVIDIA Ampere and
# later, single bf16 passes on TPU (so the bf16 figure there).
PEAK_TFLOPS = {  # device_kind substring (lower case) -> {dtype: TFLOP/s}
    "h200": {"float32": 494.7, "bfloat16": 989.4},
    "h100": {"float32": 494.7, "bfloat16": 989.4},
    "a100": {"float32": 156.0, "bfloat16": 312.0},
    "l4": {"float32": 60.0, "bfloat16": 121.0},
    "tpu v4": {"float32": 275.0, "bfloat16": 275.0},
    "tpu v5 lite": {"float32": 197.0, "bfloat16": 197.0},
    "tpu v5p": {"float32": 459.0, "bfloat16": 459.0},
    "tpu v6 lite": {"float32": 918.0, "bfloat16": 918.0},
}


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """The device's peak FLOP/s for dtype, or None for a kind not in PEAK_TFLOPS (e.g. a CPU)."""
    kind = device_kind.lower()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "tpu v5p" before "tpu v5"
        if key in kind:
            return PEAK_TFLOPS[key][dtype] * 1e12
    return None


def flops_per_token(shape: Shape, frozen_stages: float = 0.0) -> float:
    """Model FLOPs of one SAE's train step per token, plus `frozen_stages` boosting residual passes."""
    step = 2 * shape.d * shape.m + 8 * shape.k * shape.d if shape.arch == "topk" else 12 * shape.d * shape.m
    return step + frozen_stages * 4 * shape.d * shape.m


def run_config(shape: Shape, dtype: str, method: str, members: int, steps_per_stage: int) -> RunConfig:
    J = 1 if method == "single" else members
    return RunConfig(
        SAEConfig(d_in=shape.d, width=shape.m, arch=shape.arch, k=shape.k, compute_dtype=dtype),
        TrainConfig(n_tokens=steps_per_stage * shape.batch, batch_size=shape.batch, checkpoint_every=0),
        EnsembleConfig(method, J),
    )


def time_method(shape: Shape, dtype: str, method: str, members: int, repeats: int) -> dict[str, Any]:
    """Mean step time of one method (boosting: the mean over its stages) and its rates."""
    S = 1000  # steps per boosting stage: the stage index is state.step // S
    run = run_config(shape, dtype, method, members, S)
    fn = build_method(run)
    rng = np.random.default_rng(0)
    x_BD = jnp.asarray((rng.normal(size=(shape.batch, shape.d)) + rng.normal(size=shape.d)).astype(np.float32))
    box = {"state": fn.init(jax.random.key(0), x_BD)}
    key = jax.random.key(1)

    def call():
        box["state"], metrics = fn.step(box["state"], x_BD, key)
        return box["state"], metrics

    stages = range(run.ensemble.members) if method == "boosting" else [None]
    times, first = [], 0.0
    for j in stages:
        if j is not None:  # stage j: its residual runs the j frozen stages before it
            box["state"] = box["state"]._replace(step=jnp.int32(j * S))
        timing = time_calls(call, repeats, 1)
        times.append(timing["min_s"])
        first = max(first, timing["first_call_s"])
    step_s = float(np.mean(times))
    J = run.ensemble.members
    member_tokens = (J if method == "bagging" else 1) * shape.batch  # boosting trains one stage per step
    frozen = (J - 1) / 2 if method == "boosting" else 0.0
    flops = member_tokens * flops_per_token(shape, frozen)
    return {"shape": shape.name, "d": shape.d, "m": shape.m, "arch": shape.arch, "k": shape.k if shape.arch == "topk" else None,
            "batch": shape.batch, "dtype": dtype, "method": method, "members": J, "step_s": step_s,
            "first_call_s": first, "tokens_per_s": shape.batch / step_s, "member_tokens_per_s": member_tokens / step_s,
            "model_flops_per_s": flops / step_s}


def with_peak(row: dict[str, Any], device_kind: str) -> dict[str, Any]:
    peak = peak_flops(device_kind, row["dtype"])
    return {**row, "peak_flops_per_s": peak, "fraction_of_peak": None if peak is None else row["model_flops_per_s"] / peak}


def table(rows: list[dict[str, Any]]) -> str:
    head = ["shape", "dtype", "method", "J", "ms/step", "tok/s", "member-tok/s", "TFLOP/s(model)", "of peak"]
    lines = [head] + [[
        r["shape"], r["dtype"], r["method"], str(r["members"]), f"{1e3 * r['step_s']:.2f}", f"{r['tokens_per_s']:.0f}",
        f"{r['member_tokens_per_s']:.0f}", f"{r['model_flops_per_s'] / 1e12:.3f}",
        "unknown" if r["fraction_of_peak"] is None else f"{r['fraction_of_peak']:.3f}",
    ] for r in rows]
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    return "\n".join([out[0], "-+-".join("-" * w for w in widths), *out[1:]])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accelerator", description=__doc__.split("\n")[0])
    ap.add_argument("--toy", action="store_true", help="tiny shapes: a CPU smoke run in seconds")
    ap.add_argument("--members", type=int, default=8, help="J for bagging and boosting (default 8)")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma list of {', '.join(DTYPES)}")
    ap.add_argument("--shapes", default="all", help="all, or a comma list of shape names (pythia-160m, gemma-2-2b)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per case (the minimum is reported)")
    ap.add_argument("--json", help="also write the rows (and the device) as JSON here")
    args = ap.parse_args(argv)
    methods, dtypes = args.methods.split(","), args.dtypes.split(",")
    shapes = TOY_SHAPES if args.toy else SHAPES
    if args.shapes != "all":
        wanted = args.shapes.split(",")
        shapes = tuple(s for s in shapes if s.name.split(" ")[0] in wanted)
    bad = [v for v in methods if v not in METHODS] + [v for v in dtypes if v not in DTYPES]
    if bad or not shapes or args.members < 1 or args.repeats < 1:
        ap.error(f"unknown method/dtype {bad}, no shape selected, or --members/--repeats below 1: see --help")
    device = jax.devices()[0]
    kind = device.device_kind
    print(f"device: {kind} ({device.platform}, {jax.device_count()} device(s)); jax {jax.__version__}", flush=True)
    if peak_flops(kind, "float32") is None:
        print(f"peak FLOP/s unknown for device kind {kind!r}: 'of peak' is left out (add it to PEAK_TFLOPS)", flush=True)
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            for method in methods:
                rows.append(with_peak(time_method(shape, dtype, method, args.members, args.repeats), kind))
                print(f"  {shape.name} {dtype} {method}: {rows[-1]['tokens_per_s']:.0f} tok/s", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, {"device_kind": kind, "platform": device.platform, "jax": jax.__version__, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
