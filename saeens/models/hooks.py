"""Hook-site names, spelled as in TransformerLens / SAELens so that their SAEs' `hook_name` works here.

Per layer i: blocks.{i}.hook_resid_pre (block input), hook_attn_out / hook_mlp_out (what each
sub-layer adds to the residual stream, after Gemma 2's post-norms), hook_resid_mid (after the attention
add; undefined for parallel-residual models) and hook_resid_post (block output).
"""

from __future__ import annotations

import re

from saeens.errors import SaeensError

SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")


def hook_name(layer: int, site: str) -> str:
    """`hook_name(3, "resid_post") == "blocks.3.hook_resid_post"`; validates the site."""
    if site.startswith("hook_"):
        site = site[len("hook_"):]
    if site not in SITES:
        raise SaeensError(f"unknown hook site {site!r}; use one of {', '.join(SITES)}")
    if int(layer) < 0:
        raise SaeensError(f"hook layer {layer} is negative; layers count from 0")
    return f"blocks.{int(layer)}.hook_{site}"


def parse_hook(hook: str, n_layers: int | None = None, parallel_residual: bool = False) -> tuple[int, str]:
    """"blocks.3.hook_resid_post" -> (3, "resid_post"); checks the layer range when n_layers is given."""
    m = _HOOK_RE.match(hook) if isinstance(hook, str) else None
    if m is None or m.group(2) not in SITES:
        raise SaeensError(
            f"bad hook name {hook!r}; use blocks.<layer>.hook_<site> with site one of {', '.join(SITES)}"
        )
    layer, site = int(m.group(1)), m.group(2)
    if n_layers is not None and layer >= n_layers:
        raise SaeensError(f"hook {hook!r} asks for layer {layer} but the model has {n_layers} layers (0..{n_layers - 1})")
    if parallel_residual and site == "resid_mid":
        raise SaeensError(
            f"hook {hook!r}: a parallel-residual model has no resid_mid; use hook_resid_pre or hook_resid_post"
        )
    return layer, site
