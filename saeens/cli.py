"""The `saeens` command (also `python -m saeens`): demo, cache, synthetic, train, evaluate, export,
stability, features.

Every failure the user can fix is a SaeensError: printed as one line `saeens: error: ...` with
exit status 2 and no traceback (set SAEENS_DEBUG=1 for one).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any

from saeens import __version__
from saeens.demo import DemoConfig
from saeens.errors import SaeensError
from saeens.config import SplicedConfig
from saeens.train_flags import add_held_out_args, add_train_args, train_config

TRUE_FEATURES = "true_features.npy"  # the known dictionary beside a saeens synthetic cache


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="saeens", description="Ensembles of sparse autoencoders in JAX")
    ap.add_argument("--version", action="version", version=f"saeens {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("cache", help="write an activation cache (from a model and corpus, or an .npy array)")
    p.add_argument("--out", required=True)
    p.add_argument("--from-npy", help="an [n, d_in] .npy array to turn into a cache")
    p.add_argument("--model", help="model name (e.g. smollm2-135m), HF directory or .gguf file")
    p.add_argument("--layer", type=int)
    p.add_argument("--site", default="resid_post", help="hook site: resid_pre, resid_post, attn_out, mlp_out")
    p.add_argument("--dataset", default="bbc-news", help="bbc-news, tweets, shakespeare or a hub dataset name")
    p.add_argument("--tokens", type=int, default=200_000, help="training tokens to cache")
    p.add_argument("--context-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16, help="contexts per model forward")
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outlier-factor", type=float, default=10.0,
                   help="flag rows above this multiple of their split's median norm (massive activations: "
                        "training and metrics skip them); 0: flag none")

    p = sub.add_parser("synthetic", help="write a cache of synthetic activations with known features "
                       "(saeens evaluate then reports how many it recovers)")
    p.add_argument("--out", required=True)
    p.add_argument("--d-in", type=int, default=64)
    p.add_argument("--features", type=int, default=256)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--active", type=float, default=5.0, help="features active per token on average")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("train", help="train a single, expanded, bagging or boosting run")
    add_train_args(p)

    p = sub.add_parser("evaluate", help="reconstruction, sparsity and dictionary metrics of a run")
    p.add_argument("run")
    p.add_argument("--activations", help="activation cache; without it --model streams the run's held-out documents")
    p.add_argument("--split", default="test", choices=("test", "train", "all"))
    p.add_argument("--json", dest="json_out", help="write the metrics here as JSON")
    p.add_argument("--model", help="also measure spliced LM loss with this model")
    p.add_argument("--layer", type=int)
    p.add_argument("--dataset", help="text for the spliced loss (default: the cache's dataset)")
    add_held_out_args(p)
    p.add_argument("--spliced-contexts", type=int, default=SplicedConfig.n_contexts,
                   help=f"held-out contexts for the spliced loss (default: {SplicedConfig.n_contexts})")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("export", help="write a run in SAELens layout")
    p.add_argument("run")
    p.add_argument("--format", default="saelens", choices=("saelens",))
    p.add_argument("--out", required=True)

    text = "cache SmolLM2-135M activations, train single, expanded, bagging and boosting TopK SAEs, report"
    p = sub.add_parser("demo", help=text, description=text[0].upper() + text[1:] + " (a table and plots).")
    p.add_argument("--out", help="output directory (default: $XDG_CACHE_HOME or ~/.cache, then saeens/demo)")
    p.add_argument("--cache-tokens", type=int, help=f"activation rows to cache (default: {DemoConfig.cache_tokens})")
    p.add_argument("--train-tokens", type=int, help=f"training tokens per SAE / stage (default: {DemoConfig.train_tokens})")
    p.add_argument("--spliced-contexts", type=int,
                   help=f"held-out contexts for the spliced loss (default: {DemoConfig.spliced_contexts})")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("stability", help="feature stability across independently trained runs")
    p.add_argument("runs", nargs="+")
    p.add_argument("--json", dest="json_out")

    p = sub.add_parser("features", help="per-feature statistics, agreement, consensus and a static HTML dashboard")
    p.add_argument("runs", nargs="+", help="run directories; each is matched against the others")
    p.add_argument("--activations", required=True, help="activation cache the statistics stream over")
    p.add_argument("--out", required=True, help="output directory: JSON, dashboard (index.html), consensus SAEs")
    p.add_argument("--model", help="model for the text and logit effects (default: the cache's model; 'none': neither)")
    p.add_argument("--split", default="test", choices=("test", "train", "all"))
    p.add_argument("--top-n", type=int, default=10, help="top activating contexts per feature")
    p.add_argument("--select", type=int, help="show only N non-dense features: highest consensus first, then most frequent")
    p.add_argument("--consensus-t", type=int, help="consensus keeps features found by >= T members (default 2)")
    p.add_argument("--quiet", action="store_true")
    return ap


def _mesh(spec: str | None):
    if spec is None:
        return None
    from saeens.sharding import make_mesh

    try:
        ens, data = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise SaeensError(f"--mesh {spec!r} is not ENSEMBLExDATA: pass e.g. --mesh 4x2") from None
    return make_mesh(ens, data)


def _training_data(args: argparse.Namespace) -> Any:
    """The cache of --activations, or the activations --model computes as training runs."""
    if args.activations is not None:
        if args.model is not None:
            raise SaeensError("pass --activations ACTS (a cache) or --model M (a stream), not both")
        from saeens.data.cache import ActivationCache

        return ActivationCache(args.activations)
    if args.model is None or args.layer is None:
        raise SaeensError("saeens train needs --activations ACTS (a cache), or --model M and --layer L to stream from the model")
    from saeens.data.stream import model_stream

    return model_stream(args.model, args.layer, args.site, args.dataset, context_length=args.context_length,
                        test_fraction=args.test_fraction, split_seed=args.split_seed,
                        buffer_contexts=args.buffer_contexts, model_batch=args.model_batch)


def cmd_train(args: argparse.Namespace) -> None:
    from saeens.train import fit

    data = _training_data(args)
    run = train_config(args, data.d_in)
    fit(args.out, run, data, progress=not args.quiet, mesh=_mesh(args.mesh))  # saeens/runs.py checks --out
    print(f"trained {run.ensemble.method} run written to {args.out}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    import numpy as np

    from saeens.data.cache import ActivationCache
    from saeens.evals.intrinsic import evaluate_run, evaluate_sweep, is_sweep
    from saeens.tables import ev_drivers_line, members_line, print_table

    sweep = is_sweep(args.run)  # its members are separate SAEs: one row (and JSON entry) each
    if sweep and args.model:
        raise SaeensError("--model measures one SAE or ensemble, not a sweep's members: train the chosen setting as its own run")
    acts = ActivationCache(args.activations) if args.activations else _held_out(args)
    truth = Path(args.activations) / TRUE_FEATURES if args.activations else None
    if sweep:
        rows = evaluate_sweep(args.run, acts, args.split, not args.quiet, np.load(truth) if truth is not None and truth.is_file() else None)
        print_table([{"run": args.run, **row} for row in rows])
        _write_json(args.json_out, {"members": rows})
        return
    result = evaluate_run(args.run, acts, split=args.split, progress=not args.quiet)
    if args.model:
        from saeens.evals.spliced import spliced_metrics

        cfg = SplicedConfig(n_contexts=args.spliced_contexts)
        result.update(spliced_metrics(args.run, acts, args.model, args.layer, args.dataset, cfg, progress=not args.quiet))
    if truth is not None and truth.is_file():  # a saeens synthetic cache: how many of the known features the dictionary found
        result["feature_recovery"] = _feature_recovery(args.run, truth)
    print_table([{"run": args.run, **result}])
    print(ev_drivers_line(result))
    if line := members_line(result):
        print(line)
    _write_json(args.json_out, result)


def _held_out(args: argparse.Namespace) -> Any:
    """The run's held-out documents streamed through --model at its hook (saeens/data/stream.py)."""
    from saeens.data.stream import held_out_stream
    from saeens.runs import load_ensemble

    names = ("layer", "site", "dataset", "context_length", "test_fraction", "split_seed", "tokens", "model_batch")
    return held_out_stream(load_ensemble(args.run)[1].get("source") or {}, args.model, split=args.split,
                           **{k: getattr(args, k) for k in names})


def _feature_recovery(run: str, truth: Path) -> float:
    import numpy as np

    from saeens import ensemble
    from saeens.synthetic import feature_recovery
    from saeens.train import load_ensemble

    return feature_recovery(np.load(truth), np.asarray(ensemble.decoder(load_ensemble(run)[0])))


def cmd_stability(args: argparse.Namespace) -> None:
    from saeens.evals.stability import stability_of_runs
    from saeens.tables import print_table, stability_members_line

    result = stability_of_runs(args.runs)
    print_table([{k: v for k, v in result.items() if not isinstance(v, list) and k != "ci_note"}])
    if line := stability_members_line(result):
        print(line)
    if result["ci_note"]:
        print(f"note: {result['ci_note']}")
    _write_json(args.json_out, result)


def cmd_export(args: argparse.Namespace) -> None:
    from saeens.io.export import export_saelens
    from saeens.runs import load_ensemble

    ens, meta = load_ensemble(args.run)
    out = export_saelens(ens, meta["method"], Path(args.out), hook_name=meta.get("hook"), model_name=meta.get("model"))
    print(f"exported {meta['method']} run to {out}")


def _load_activation_array(path: Path):
    """An [n, d_in] float array from a .npy file (memory-mapped); other floats than float32 are
    converted with a one-line note, anything else is refused with the fix."""
    import numpy as np

    if not path.is_file():
        raise SaeensError(f"{path} does not exist: pass an existing [n, d_in] .npy file")
    try:
        arr = np.load(path, mmap_mode="r")  # never unpickles: a pickle or a text file fails here
    except (ValueError, OSError, EOFError):
        raise SaeensError(f"{path} is not a numeric .npy array (a text or pickle file?): write it with numpy.save") from None
    if not np.issubdtype(arr.dtype, np.floating):
        raise SaeensError(
            f"{path} holds {arr.dtype} values, not floating-point activations: save them as float32 "
            "(integer arrays are often token ids, not activations)"
        )
    if arr.dtype != np.float32:
        print(f"note: {path} holds {arr.dtype} values; the cache stores them as float32", file=sys.stderr)
    return arr


def cmd_cache(args: argparse.Namespace) -> None:
    from saeens.data.cache import cache_from_array

    if args.from_npy:
        path = Path(args.from_npy)
        arr = _load_activation_array(path)
        out = cache_from_array(arr, args.out, args.test_fraction, {"source": str(path.name)},
                               outlier_factor=args.outlier_factor or None)
        print(f"cached {arr.shape[0]} rows of d_in={arr.shape[1]} in {out}")
        return
    if not args.model or args.layer is None:
        raise SaeensError("saeens cache needs --from-npy FILE, or --model M and --layer L")
    from saeens.data.build import build_cache

    out = build_cache(
        model_name=args.model, layer=args.layer, site=args.site, dataset=args.dataset, n_tokens=args.tokens,
        out=args.out, context_length=args.context_length, batch_size=args.batch_size,
        test_fraction=args.test_fraction, seed=args.seed, outlier_factor=args.outlier_factor or None,
    )
    print(f"activation cache written to {out}")


def cmd_synthetic(args: argparse.Namespace) -> None:
    from saeens.data.cache import cache_from_array
    from saeens.io.files import atomic_save_npy
    from saeens.synthetic import make_synthetic

    syn = make_synthetic(args.tokens, args.d_in, args.features, args.active, args.noise, seed=args.seed)
    out = cache_from_array(syn.acts_ND, args.out, 0.1, {"model": "synthetic", "features": args.features})
    atomic_save_npy(out / TRUE_FEATURES, syn.features_FD)  # saeens evaluate reports their recovery
    print(f"synthetic cache ({args.tokens} rows, d_in={args.d_in}, {args.features} true features) in {out}")


def _write_json(path: str | None, obj: dict[str, Any]) -> None:
    """obj as JSON at path (when given); NaN/Inf become null so the file stays valid JSON."""
    if path:
        from saeens.io.files import atomic_write_json

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, obj)


def cmd_demo(args: argparse.Namespace) -> None:
    import dataclasses

    from saeens.demo import default_out, run_demo

    given = {"cache_tokens": args.cache_tokens, "train_tokens": args.train_tokens, "spliced_contexts": args.spliced_contexts}
    cfg = dataclasses.replace(DemoConfig(), **{k: v for k, v in given.items() if v is not None})
    run_demo(args.out or default_out(), cfg, progress=not args.quiet)


def cmd_features(args: argparse.Namespace) -> None:
    from saeens.features import FeaturesConfig, build

    if args.top_n < 1 or (args.select is not None and args.select < 1):
        raise SaeensError("--top-n and --select must be positive: pass e.g. --top-n 10 --select 200")
    cfg = FeaturesConfig(split=args.split, top_n=args.top_n, select=args.select, consensus_t=args.consensus_t)
    summary = build(args.runs, args.activations, args.out, args.model, cfg, progress=not args.quiet)
    for r in summary["runs"]:
        c = r["consensus"]
        print(f"{r['name']}: {r['n_tokens']} tokens at {r['tokens_per_second']:.0f} tok/s; consensus (t={c['t']}) keeps "
              f"{c['kept']} of {c['of']} features, EV {c['metrics_full']['explained_variance']:.4f} -> "
              f"{c['metrics_consensus']['explained_variance']:.4f}")
    print(f"dashboard: {Path(args.out) / 'index.html'}")


COMMANDS = {
    "demo": cmd_demo,
    "cache": cmd_cache,
    "synthetic": cmd_synthetic,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
    "stability": cmd_stability,
    "features": cmd_features,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # saeens uses transformers only for tokenizers: its "PyTorch was not found" advice does not apply
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    logging.getLogger("absl").setLevel(logging.CRITICAL)  # orbax logs what our one-line error says
    try:
        COMMANDS[args.command](args)
    except SaeensError as e:
        if os.environ.get("SAEENS_DEBUG"):
            raise
        print(f"saeens: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied, ...: what was written before stays
        if os.environ.get("SAEENS_DEBUG"):
            raise
        where = f" while writing {e.filename}" if e.filename else ""
        fix = "free some space or choose another --out" if e.errno == errno.ENOSPC else "check the path and its permissions"
        print(f"saeens: error: {e.strerror or e}{where}: {fix}; files written before are kept", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saeens: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
