"""Atomic writes and JSON reads with one-line errors: the only place saeens touches files raw.

Every write goes to a temporary sibling that is renamed into place, so a reader (or a crash) never
sees half a file, and a failed write leaves the previous file as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from saeens.errors import SaeensError


def atomic_write(path: str | Path, write: Callable[[IO], None], mode: str = "w") -> Path:
    """write(f) into path.tmp, fsync, rename onto path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> Path:
    """JSON with NaN/Inf written as null (bare NaN is not valid JSON); indent None: compact, one line."""
    seps = (",", ":") if indent is None else None
    return atomic_write_text(path, json.dumps(_json_safe(obj), indent=indent, separators=seps) + "\n")


def atomic_save_npy(path: str | Path, arr: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, arr), mode="wb")


def read_json(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A JSON object from path, or a one-line SaeensError naming `what` and the `fix`."""
    path = Path(path)
    if not path.is_file():
        raise SaeensError(f"{what} {path} does not exist: {fix}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SaeensError(f"{what} {path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(d, dict):
        raise SaeensError(f"{what} {path} must hold a JSON object: {fix}")
    return d


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj
