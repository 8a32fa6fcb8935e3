"""Rows of results as a markdown table (readable in a terminal too)."""

from __future__ import annotations

from typing import Any


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of rows; columns are the union of their keys, in first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r))

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
