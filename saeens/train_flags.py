"""`saeens train`'s flags, derived from the config dataclasses, and their merge with a --config file.

The flags' own defaults stay None so that a --config file can supply any value (explicit flags
override it); the help text shows the dataclass defaults that apply when neither gives one. Flags
that the chosen architecture does not use are refused here, not in SAEConfig: a stored config holds
k and both coefficients for every architecture. --lr, --l1, --l0 and --bandwidth take a comma list
(e.g. --lr 1e-4,3e-4): two or more values go to the sweep section, and --method sweep trains their
grid (--members is then the grid's size).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any

from saeens.config import ARCHS, COMPUTE_DTYPES, METHODS, SWEPT, EnsembleConfig, RunConfig, SAEConfig, SweepConfig, TrainConfig
from saeens.errors import SaeensError
from saeens.io.files import read_json

SECTIONS = {"sae": SAEConfig, "train": TrainConfig, "ensemble": EnsembleConfig, "sweep": SweepConfig}
# flag, config section, field, type, help (the default is appended from the dataclass field)
FLAGS = (
    ("--method", "ensemble", "method", str, "how SAEs combine (sweep: one member per point of the comma lists' grid)"),
    ("--members", "ensemble", "members", int, "J: ensemble members / boosting stages / expansion factor (a sweep sets it to the grid's size)"),
    ("--arch", "sae", "arch", str, "SAE activation"),
    ("--width", "sae", "width", int, "latents per member (m)"),
    ("--k", "sae", "k", int, "active latents per token (topk, batchtopk only)"),
    ("--l1", "sae", "l1_coeff", float, "L1 coefficient (relu only)"),
    ("--l0", "sae", "l0_coeff", float, "L0 coefficient (jumprelu only)"),
    ("--bandwidth", "sae", "jumprelu_bandwidth", float, "JumpReLU straight-through bandwidth (jumprelu only)"),
    ("--compute-dtype", "sae", "compute_dtype", str, "training matmuls and codes (bfloat16 on GPU/TPU; params stay float32)"),
    ("--dead-tokens", "sae", "dead_tokens", int, "tokens without firing after which a latent is dead"),
    ("--tokens", "train", "n_tokens", int, "training tokens per SAE / boosting stage"),
    ("--batch-size", "train", "batch_size", int, "tokens per step"),
    ("--lr", "train", "lr", float, "Adam learning rate"),
    ("--seed", "train", "seed", int, "seed of the initial keys and the data order"),
    ("--checkpoint-every", "train", "checkpoint_every", int, "steps between checkpoints (0: only at the end)"),
)
CHOICES = {"method": METHODS, "arch": ARCHS, "compute_dtype": COMPUTE_DTYPES}
ARCH_ONLY = {"k": ("topk", "batchtopk"), **{name: archs for name, archs in SWEPT.items() if archs}}  # field -> archs using it


def _numbers(text: str) -> tuple[float, ...]:
    """A sweepable flag's value: one number or a comma list of them."""
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a comma list of numbers (e.g. 1e-4,3e-4)") from None


def _default(section: str, name: str) -> Any:
    field = next(f for f in dataclasses.fields(SECTIONS[section]) if f.name == name)
    return field.default if field.default is not dataclasses.MISSING else None


def _flag_of(name: str) -> str:
    return next(flag for flag, _, field, _, _ in FLAGS if field == name)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """Every flag of `saeens train`; help shows the default that applies when no flag or file sets it."""
    p.add_argument("--activations", help="activation cache directory (saeens cache); without it --model streams them")
    add_stream_args(p)
    p.add_argument("--out", required=True, help="run directory; an existing run is resumed")
    p.add_argument("--config", help="JSON file with sections sae, train, ensemble (flags override it)")
    for flag, section, name, typ, text in FLAGS:
        default = _default(section, name)
        shown = "required: here or in --config" if default is None else f"default: {default}"
        metavar = None if name in CHOICES else flag[2:].upper().replace("-", "_")
        if name in SWEPT:
            typ, text, metavar = _numbers, f"{text}; a comma list sweeps it", f"{metavar}[,{metavar}...]"
        p.add_argument(flag, dest=name, type=typ, choices=CHOICES.get(name), metavar=metavar, help=f"{text} ({shown})")
    p.add_argument("--no-normalize", action="store_true",
                   help="train on raw activations (default: scale inputs to mean norm sqrt(d_in), folded back on export)")
    p.add_argument("--mesh", help="device mesh ENSEMBLExDATA, e.g. 4x2: members over the first axis, batch over the second")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_stream_args(p: argparse.ArgumentParser) -> None:
    """--model M --layer L [--dataset D ...]: train on activations the model computes as training
    runs (saeens/data/stream.py); the corpus is split and packed as `saeens cache` does it."""
    from saeens.data.build import CONTEXT_LENGTH, SPLIT_SEED, TEST_FRACTION
    from saeens.data.stream import BUFFER_CONTEXTS, MODEL_BATCH

    g = p.add_argument_group("streaming from a model (instead of --activations)")
    g.add_argument("--model", help="model name (e.g. smollm2-135m), HF directory or .gguf file")
    g.add_argument("--layer", type=int, help="block of the hook")
    g.add_argument("--site", default="resid_post", help="hook site: resid_pre, resid_post, attn_out, mlp_out (default: resid_post)")
    g.add_argument("--dataset", default="bbc-news", help="bbc-news, tweets, shakespeare or a hub dataset name (default: bbc-news)")
    g.add_argument("--context-length", type=int, default=CONTEXT_LENGTH, help=f"tokens per context (default: {CONTEXT_LENGTH})")
    g.add_argument("--test-fraction", type=float, default=TEST_FRACTION,
                   help=f"documents held out for saeens evaluate (default: {TEST_FRACTION})")
    g.add_argument("--split-seed", type=int, default=SPLIT_SEED, help=f"seed of the document split (default: {SPLIT_SEED})")
    g.add_argument("--buffer-contexts", type=int, default=BUFFER_CONTEXTS,
                   help=f"contexts whose rows are shuffled together: the shuffle buffer (default: {BUFFER_CONTEXTS})")
    g.add_argument("--model-batch", type=int, default=MODEL_BATCH, help=f"contexts per model call (default: {MODEL_BATCH})")


def add_held_out_args(p: argparse.ArgumentParser) -> None:
    """`saeens evaluate RUN --model M` without --activations: the run's held-out documents streamed
    through the model; unset flags take the values the run recorded."""
    from saeens.data.stream import MODEL_BATCH

    g = p.add_argument_group("streaming from --model (instead of --activations; default: the run's values)")
    g.add_argument("--site", help="hook site (with --layer)")
    g.add_argument("--context-length", type=int, help="tokens per context")
    g.add_argument("--test-fraction", type=float, help="documents held out (must be the run's)")
    g.add_argument("--split-seed", type=int, help="seed of the document split (must be the run's)")
    g.add_argument("--tokens", type=int, help="held-out tokens to stream (default: every held-out context)")
    g.add_argument("--model-batch", type=int, default=MODEL_BATCH, help=f"contexts per model call (default: {MODEL_BATCH})")


def train_config(args: argparse.Namespace, d_in: int) -> RunConfig:
    """The RunConfig from --config and the flags; every problem is found, the first is reported with its fix."""
    base: dict[str, Any] = (
        read_json(args.config, "config file", "pass a JSON file with sae, train and ensemble sections") if args.config else {}
    )
    d = {s: dict(base.get(s, {})) for s in SECTIONS}
    for extra in set(base) - set(d):
        d[extra] = base[extra]  # RunConfig.from_dict names unknown sections
    for _, section, name, _, _ in FLAGS:
        value = getattr(args, name)
        if name in SWEPT and value is not None and len(value) > 1:
            d["sweep"][name] = list(value)
        elif value is not None:
            d[section][name] = value[0] if name in SWEPT else value
    if d["ensemble"].get("method") == "sweep" and "members" not in d["ensemble"]:
        d["ensemble"]["members"] = math.prod(len(v) or 1 for v in d["sweep"].values() if isinstance(v, list))
    if args.no_normalize:
        d["train"]["normalize_activations"] = False
    problems = []
    if d["sae"].get("d_in", d_in) != d_in:
        problems.append(f"config says d_in={d['sae']['d_in']} but the activations have d_in={d_in}: fix the config")
    d["sae"]["d_in"] = d_in
    if "width" not in d["sae"]:
        problems.append("no SAE width given: pass --width M (latents per member)")
    arch = d["sae"].get("arch", _default("sae", "arch"))
    for name, archs in ARCH_ONLY.items():
        if getattr(args, name) is not None and arch not in archs:
            problems.append(f"{_flag_of(name)} applies to {' and '.join(archs)}, not to {arch}: drop {_flag_of(name)}")
    for section, typ in SECTIONS.items():  # each section on its own: a bad value in one hides none in another
        try:
            typ(**d[section])
        except SaeensError as e:
            problems.append(str(e))
        except TypeError:
            pass  # unknown or missing keys: RunConfig.from_dict names them below
    if problems:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise SaeensError(problems[0] + more)
    return RunConfig.from_dict(d)
