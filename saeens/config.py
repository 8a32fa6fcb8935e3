"""Frozen configs: one small dataclass per concern, validated on construction.

Validation raises SaeensError with a one-line message that names the bad field and the fix, so
the CLI, config files and Python callers all reject bad input the same way.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

from saeens.errors import SaeensError
from saeens.io.files import read_json

ARCHS = ("relu", "topk", "batchtopk", "jumprelu")
METHODS = ("single", "expanded", "bagging", "boosting", "sweep")
COMPUTE_DTYPES = ("float32", "bfloat16")


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise SaeensError(msg)


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    """Architecture of ONE SAE (an ensemble member, a boosting stage or the expanded baseline)."""

    d_in: int
    width: int
    arch: str = "topk"
    k: int = 32  # topk / batchtopk: active latents per token
    l1_coeff: float = 5.0  # relu: L1 penalty on the codes
    l0_coeff: float = 0.75  # jumprelu: penalty on the (straight-through) L0
    jumprelu_bandwidth: float = 0.001  # jumprelu: rectangle-kernel width eps of the STE
    jumprelu_init_threshold: float = 0.001
    aux_k: int | None = None  # AuxK latents; None -> d_in // 2 (Gao et al.)
    aux_coeff: float = 1.0 / 32.0
    dead_tokens: int = 1_000_000  # a latent silent for this many tokens counts as dead
    batchtopk_threshold_decay: float = 0.99  # EMA of the inference threshold
    kernel: str = "sparse"  # topk/batchtopk training: "sparse" (saeens/kernels.py) or "dense" (reference)
    compute_dtype: str = "float32"  # training matmuls and codes; "bfloat16" on accelerators (params stay fp32)

    def __post_init__(self) -> None:
        _require(self.arch in ARCHS, f"unknown architecture {self.arch!r}: use one of {', '.join(ARCHS)}")
        _require(self.d_in >= 1, f"d_in must be >= 1, got {self.d_in}: check the activation cache")
        _require(self.width >= 1, f"width must be >= 1, got {self.width}: pass --width M with M >= 1")
        if self.arch in ("topk", "batchtopk"):
            _require(
                1 <= self.k <= self.width,
                f"k={self.k} must be between 1 and the width {self.width}: lower --k or raise --width",
            )
        _require(self.l1_coeff >= 0, f"l1_coeff must be >= 0, got {self.l1_coeff}")
        _require(self.l0_coeff >= 0, f"l0_coeff must be >= 0, got {self.l0_coeff}")
        _require(self.jumprelu_bandwidth > 0, "jumprelu_bandwidth must be > 0")
        _require(self.dead_tokens >= 1, "dead_tokens must be >= 1")
        _require(self.kernel in ("dense", "sparse"), f"unknown kernel {self.kernel!r}: use dense or sparse")
        _require(
            self.compute_dtype in COMPUTE_DTYPES,
            f"unknown compute_dtype {self.compute_dtype!r}: use {' or '.join(COMPUTE_DTYPES)}",
        )

    @property
    def k_aux(self) -> int:
        return min(self.width, self.aux_k if self.aux_k is not None else max(1, self.d_in // 2))

    def replace(self, **kw: Any) -> "SAEConfig":
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping; the paper's defaults (Adam beta1=0, clip 1, constant lr)."""

    n_tokens: int = 1_000_000  # per SAE (each boosting stage gets the full budget)
    batch_size: int = 4096
    lr: float = 3e-4
    beta1: float = 0.0
    beta2: float = 0.999
    grad_clip: float = 1.0
    seed: int = 0
    normalize_activations: bool = True  # scale inputs to mean norm sqrt(d_in); folded back on export
    geometric_median_samples: int = 4096
    checkpoint_every: int = 500  # steps; 0 = only at the end
    log_every: int = 50

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"learning rate must be > 0, got {self.lr}: pass e.g. --lr 3e-4")
        _require(self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}: pass e.g. --batch-size 4096")
        _require(
            self.n_tokens >= self.batch_size,
            f"--tokens {self.n_tokens} is below one batch of {self.batch_size} tokens: pass --batch-size "
            f"{self.n_tokens} or less, or raise --tokens",
        )
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "Adam betas must lie in [0, 1)")
        _require(self.grad_clip > 0, "grad_clip must be > 0")
        _require(self.checkpoint_every >= 0, "checkpoint_every must be >= 0")

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """How SAEs are combined: single, expanded (one SAE of J*m latents), bagging, boosting, or a
    sweep (J members that differ in hyperparameters, see SweepConfig)."""

    method: str = "single"
    members: int = 1

    def __post_init__(self) -> None:
        _require(self.method in METHODS, f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        _require(self.members >= 1, f"members J must be >= 1, got {self.members}: pass --members 1 or more")


SWEPT = {"lr": None, "l1_coeff": ("relu",), "l0_coeff": ("jumprelu",), "jumprelu_bandwidth": ("jumprelu",)}  # None: every arch


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """Method sweep: one member per point of the grid of these lists (an empty list keeps the train
    or sae section's value), trained as one stacked ensemble. Member order: the Cartesian product in
    the order lr, l1_coeff, l0_coeff, jumprelu_bandwidth, the last varying fastest."""

    lr: tuple[float, ...] = ()
    l1_coeff: tuple[float, ...] = ()
    l0_coeff: tuple[float, ...] = ()
    jumprelu_bandwidth: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        for name in SWEPT:  # JSON gives lists; a hashable config needs tuples
            values = getattr(self, name)
            ok = isinstance(values, (list, tuple)) and all(isinstance(v, (int, float)) for v in values)
            _require(ok, f"sweep {name} must be a list of numbers, got {values!r}: write e.g. [1e-4, 3e-4]")
            object.__setattr__(self, name, tuple(float(v) for v in values))

    @property
    def is_empty(self) -> bool:
        return not any(getattr(self, name) for name in SWEPT)

    def settings(self, sae: SAEConfig, train: TrainConfig) -> list[dict[str, float]]:
        """Every member's lr, l1_coeff, l0_coeff and jumprelu_bandwidth, in member order."""
        base = {"lr": train.lr, **{n: getattr(sae, n) for n in SWEPT if n != "lr"}}
        axes = [getattr(self, n) or (base[n],) for n in SWEPT]
        return [dict(zip(SWEPT, point)) for point in itertools.product(*axes)]


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs; saeens/runs.py writes it as config.json in the run directory."""

    sae: SAEConfig
    train: TrainConfig
    ensemble: EnsembleConfig
    sweep: SweepConfig = SweepConfig()

    def __post_init__(self) -> None:
        J = self.ensemble.members
        _require(
            self.ensemble.method != "single" or J == 1,
            f"method single trains one SAE but --members is {J}: use --members 1, or expanded/bagging/boosting",
        )
        if self.ensemble.method != "sweep":
            _require(self.sweep.is_empty, "lists of hyperparameters train a grid: pass --method sweep, or one value each")
            return
        for name, archs in SWEPT.items():
            _require(not getattr(self.sweep, name) or archs is None or self.sae.arch in archs,
                     f"sweeping {name} applies to {' and '.join(archs or ())}, not to {self.sae.arch}: drop it from the sweep")
        grid = self.sweep.settings(self.sae, self.train)
        _require(J == len(grid), f"the sweep grid has {len(grid)} points but --members is {J}: drop --members (a sweep sets it)")
        for point in grid:  # each member's values pass the same checks as a single run's
            dataclasses.replace(self.train, lr=point["lr"])
            self.sae.replace(**{n: v for n, v in point.items() if n != "lr"})

    def to_dict(self) -> dict[str, Any]:
        """The sections as JSON; the sweep section only for a sweep (other runs' files are unchanged)."""
        keys = ("sae", "train", "ensemble") + (("sweep",) if self.ensemble.method == "sweep" else ())
        return {k: dataclasses.asdict(getattr(self, k)) for k in keys}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        parts = {}
        for key, typ in (("sae", SAEConfig), ("train", TrainConfig), ("ensemble", EnsembleConfig), ("sweep", SweepConfig)):
            parts[key] = _build(typ, d.get(key, {}), key)
        extra = set(d) - {"sae", "train", "ensemble", "sweep"}
        _require(not extra, f"unknown config section(s) {sorted(extra)}: use only sae, train, ensemble, sweep")
        return cls(**parts)

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        return cls.from_dict(read_json(path, "config file", "pass a JSON file with sae, train and ensemble sections"))


def _build(typ: type, values: dict[str, Any], section: str) -> Any:
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = sorted(set(values) - names)
    _require(not unknown, f"unknown key(s) {unknown} in config section {section!r}: valid keys are {sorted(names)}")
    try:
        return typ(**values)
    except TypeError as e:  # a missing required field
        raise SaeensError(f"config section {section!r} is incomplete ({e}): add the missing key") from None


@dataclasses.dataclass(frozen=True)
class SplicedConfig:
    """How much held-out text `evals.spliced.spliced_metrics` measures; the contexts' length and
    split are the cache's. Here, not in evals/spliced.py, so the CLI's flags need no JAX."""

    n_contexts: int = 64
    batch_size: int = 8
