"""EleutherAI sparsify's TopK training step, timed side by side with ours on the same batch.

sparsify (`pip install eai-sparsify`, PyTorch) is the fastest PyTorch SAE trainer we know of. Its
step here is its Trainer's, for one SAE on the reconstruction (FVU) loss: renormalise W_dec, the
forward with the dead-latent mask (AuxK on, auxk_alpha = 1/32 as our aux_coeff), backward, remove
the W_dec gradient parallel to its rows, Adam with OUR betas (beta1 = 0, beta2 = 0.999; sparsify's
default optimizer is signum, which does less work) and the dead-latent counters. It does not clip
gradients (ours does). Torch gets as many threads as XLA uses (every core this process may run on).

Ratios come from PAIRED timing: one step of ours, one of sparsify's, alternating, and the minimum
of each, so load from other processes hits both sides alike.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from benchmarks.harness import Sizes, batch_of, loadavg, matmul_time, single_stepper, stats, timed, train_cfg


def threads() -> int:
    return len(os.sched_getaffinity(0))


def sparsify_stepper(s: Sizes, n_dead: int, dead_tokens: int) -> Callable[[], Any] | None:
    """One call = one sparsify training step on the fixed batch; None when sparsify is missing."""
    try:
        import torch
        from sparsify import SparseCoder, SparseCoderConfig
    except ImportError:
        return None
    torch.set_num_threads(threads())
    torch.manual_seed(0)
    tcfg = train_cfg(s)
    x = torch.from_numpy(batch_of(s))
    sae = SparseCoder(s.d, SparseCoderConfig(num_latents=s.m, k=s.k), device="cpu", dtype=torch.float32)
    opt = torch.optim.Adam(sae.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2))
    since = torch.zeros(s.m, dtype=torch.long)
    since[:n_dead] = dead_tokens + 1

    def call():
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=since > dead_tokens, total_variance=(x - x.mean(0)).pow(2).sum())
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            fired = torch.zeros(s.m, dtype=torch.bool)
            fired[out.latent_indices.flatten()] = True
            since.add_(s.batch)
            since[fired] = 0
        return None

    return call


def side_by_side(s: Sizes, n_dead: int = 0) -> dict[str, Any] | None:
    """Our sparse TopK step vs sparsify's, alternating; None when sparsify is not installed."""
    from saeens.config import SAEConfig

    peer = sparsify_stepper(s, n_dead, SAEConfig(d_in=s.d, width=s.m).dead_tokens)
    if peer is None:
        return None
    ours, _ = single_stepper(s, "topk", "sparse", n_dead)
    load0, t_mm = loadavg(), matmul_time(s)
    for call in (ours, peer, ours, peer):  # compile, first allocations
        timed(call)
    runs: dict[str, list[tuple[float, float]]] = {"ours": [], "sparsify": []}
    for _ in range(s.repeats):
        runs["ours"].append(timed(ours))
        runs["sparsify"].append(timed(peer))
    out = {name: stats(*map(list, zip(*r))) for name, r in runs.items()}
    t_ours, t_peer = out["ours"]["min_s"], out["sparsify"]["min_s"]
    return {
        "case": "topk single" + (f" dead={n_dead}" if n_dead else ""), "n_dead_start": n_dead, "threads": threads(),
        **out, "ours_tokens_per_s": s.batch / t_ours, "sparsify_tokens_per_s": s.batch / t_peer,
        "speedup_over_sparsify": t_peer / t_ours,
        "speedup_over_sparsify_cpu_time": out["sparsify"]["min_cpu_s"] / out["ours"]["min_cpu_s"],
        "matmul_s": t_mm, "ours_fraction_of_encoder_bound": t_mm / t_ours,
        "sparsify_fraction_of_encoder_bound": t_mm / t_peer,
        "sparsify_version": _version(), "loadavg_before": load0, "loadavg_after": loadavg(),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("eai-sparsify")

