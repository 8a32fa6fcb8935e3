"""Rows of results as a markdown table (readable in a terminal too)."""

from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of rows; columns are the union of their keys, in first-seen order. Nested
    values (lists, dicts: e.g. ev_drivers) are not cells; they stay in the JSON."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, tuple, dict))))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    cells = [[fmt(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(keys), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def print_table(rows: list[dict[str, Any]]) -> None:
    print(format_table(rows))


def ev_drivers_line(result: dict[str, Any], n: int = 3) -> str:
    """One line under an evaluation table: the per-dimension EV, the pooled one, and the dimensions
    that pull the first down (metrics.ev_drivers), so a negative mean is explained, not shown bare."""
    dims = ", ".join(f"dim {d['dim']} (EV {d['explained_variance']:.3g}, {100 * d['variance_share']:.2g}% of the "
                     f"variance, {100 * d['shortfall_share']:.0f}% of the shortfall)" for d in result["ev_drivers"][:n])
    return (f"explained variance {result['explained_variance']:.4g} per dimension, "
            f"{result['explained_variance_pooled']:.4g} pooled; lowest: {dims}")


def members_line(result: dict[str, Any]) -> str:
    """One line under an ensemble's evaluation table: each member's (boosting: each stage's) l0 and
    dead fraction (metrics.finalize's per-member split); empty for a single SAE."""
    return f"per member: {per_member_text(result)}" if "l0_per_member" in result else ""


def stability_members_line(result: dict[str, Any]) -> str:
    """One line under `saeens stability`'s table for ensembles: the stability of each member's (boosting:
    each stage's) features alone, beside the chance level they share; empty for single SAEs."""
    if "stability_per_member" not in result:
        return ""
    return ("stability per member: " + " / ".join(f"{v:.3g}" for v in result["stability_per_member"])
            + f" (chance {result['stability_chance']:.3g} for each)")


def per_member_text(result: dict[str, Any]) -> str:
    """'l0 a / b / ...; dead fraction c / d / ...' of a result holding the per-member split."""
    return "l0 " + " / ".join(f"{v:.3g}" for v in result["l0_per_member"]) + "; dead fraction " + \
        " / ".join(f"{v:.3g}" for v in result["dead_fraction_per_member"])
