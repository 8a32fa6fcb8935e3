"""The experiment scales: every setting of the tiny, full and gpu studies in one table (see
experiments/common.py for what each scale is for, and experiments/README.md for the budgets)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    cache_tokens: int  # train rows of the shared cache (test rows: TEST_FRACTION of all rows)
    context_length: int
    width: int  # per member; the expanded SAE has members * width
    k: int  # TopK, the main architecture
    members: int  # J of table 1 (the J sweep goes 1..members)
    seeds: int  # independent TopK ensembles (stability, confidence intervals)
    train_tokens: int  # per SAE / per boosting stage
    batch_size: int
    lr: float
    kernel: str  # TopK training path
    other_archs: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]  # (arch, SAEConfig overrides)
    other_seeds: int  # independent ensembles of the other architectures
    other_train_tokens: int  # per SAE / boosting stage of the other architectures
    pareto_ks: tuple[int, ...]
    pareto_members: int  # J of the Pareto ensembles (the k = main k point slices table 1's runs)
    spliced_contexts: int  # table 1, Pareto: contexts of context_length tokens
    sweep_spliced_contexts: int  # J sweep (clean and zero-ablation losses computed once)
    connectivity_tokens: int  # co-firing matrix over this many test tokens (F x F per chunk)
    hungarian_max_features: int  # Hungarian stability only up to this many features (O(F^3))
    probe_train_per_class: int
    probe_test_per_class: int
    probe_context: int
    scr_train_per_group: int
    scr_test_per_group: int
    scr_ns: tuple[int, ...]
    checkpoint_every: int
    batch_forward: int
    dead_tokens: int | None = None  # a latent silent this long is dead (TopK's AuxK revives it); None: train tokens
    budgets: tuple[int, ...] = ()  # TopK: tokens at which single/expanded/bagging runs are also evaluated as they train
    other_budgets: tuple[int, ...] = ()  # the same for the other architectures
    sweep_seeds: int | None = None  # independent ensembles of the J sweep (None: seeds); each committed as it lands

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_size

    def budgets_of(self, arch: str) -> tuple[int, ...]:
        """The smaller budgets at which `arch`'s runs are evaluated, ascending; the first is the old
        study's budget, where boosting also trains runs of its own (experiments/across_budgets.py)."""
        return tuple(sorted(self.budgets if arch == "topk" else self.other_budgets))


# ReLU's L1 and JumpReLU's initial threshold chosen for an L0 near TopK's k = 32 after ~150 steps by
# `python -m experiments.sparsity_probe` (results/sparsity_probe.md). saeens' defaults are made for long
# runs: JumpReLU's log-threshold moves only ~lr per step through its straight-through estimator, so
# in a few hundred steps its initial value sets the L0.
OTHER_ARCHS = (("relu", (("l1_coeff", 2.5),)),
               ("jumprelu", (("l0_coeff", 0.75), ("jumprelu_init_threshold", 1.0), ("jumprelu_bandwidth", 0.1))))

SCALES = {
    "tiny": Scale(
        name="tiny", cache_tokens=4096, context_length=64, width=64, k=8, members=3, seeds=2,
        train_tokens=4096, batch_size=256, lr=1e-3, kernel="dense",
        other_archs=OTHER_ARCHS, other_seeds=2,
        other_train_tokens=2048, pareto_ks=(4, 8), pareto_members=2, spliced_contexts=4, sweep_spliced_contexts=2,
        connectivity_tokens=256, hungarian_max_features=256,
        probe_train_per_class=12, probe_test_per_class=6, probe_context=32,
        scr_train_per_group=12, scr_test_per_group=6, scr_ns=(2, 5, 10, 20, 50, 100),
        checkpoint_every=0, batch_forward=8,
    ),
    # 10x the first study's 300k tokens (the convergence curves, experiments/convergence.py, show how far
    # from its plateau each method is there); batch, lr and dead_tokens as before, so the evaluations
    # on the way at the first study's budgets (TopK 300k, the others 150k tokens) and at a third of the
    # new one reproduce the old budget with the same seeds
    "full": Scale(
        name="full", cache_tokens=2_000_000, context_length=128, width=1152, k=32, members=8, seeds=4,
        train_tokens=3_000_000, batch_size=1024, lr=1e-3, kernel="sparse",
        other_archs=OTHER_ARCHS, other_seeds=2,
        other_train_tokens=1_500_000, pareto_ks=(8, 16, 32, 64), pareto_members=4, spliced_contexts=32,
        sweep_spliced_contexts=16, connectivity_tokens=4096, hungarian_max_features=2048,
        probe_train_per_class=200, probe_test_per_class=100, probe_context=128,
        scr_train_per_group=300, scr_test_per_group=150, scr_ns=(2, 5, 10, 20, 50, 100, 200, 500),
        checkpoint_every=50, batch_forward=16, dead_tokens=30_000, budgets=(300_000, 1_000_000),
        other_budgets=(150_000, 500_000), sweep_seeds=3,
    ),
    # every packaged token cached (~2.7M train rows) and trained for ~11 epochs: 30M tokens per SAE /
    # boosting stage; batch 4096 keeps the step count (7.3k) and the wall time within ~8 min on one GPU
    "gpu": Scale(
        name="gpu", cache_tokens=3_000_000, context_length=128, width=1152, k=32, members=8, seeds=2,
        train_tokens=30_000_000, batch_size=4096, lr=1e-3, kernel="dense",
        other_archs=(), other_seeds=0,
        other_train_tokens=15_000_000, pareto_ks=(32,), pareto_members=4, spliced_contexts=64,
        sweep_spliced_contexts=16, connectivity_tokens=4096, hungarian_max_features=2048,
        probe_train_per_class=200, probe_test_per_class=100, probe_context=128,
        scr_train_per_group=300, scr_test_per_group=150, scr_ns=(2, 5, 10, 20, 50, 100, 200, 500),
        checkpoint_every=250, batch_forward=64, dead_tokens=30_000, budgets=(300_000, 3_000_000),
    ),
}
