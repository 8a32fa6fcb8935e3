"""Orbax checkpoints of a train state in <run>/checkpoints: save, restore onto any layout, step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from saeens.errors import SaeensError


def manager(run_dir: Path) -> Any:
    """Synchronous saves (a step is complete on disk when save returns), the last two kept."""
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=False),
    )


def restore(mngr: Any, abstract_state: Any) -> Any:
    """The latest step onto abstract_state's shapes (and shardings), or a one-line error."""
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    try:
        return mngr.restore(step, args=ocp.args.StandardRestore(abstract_state))
    except Exception as e:  # orbax raises many types for a torn or foreign checkpoint
        raise SaeensError(
            f"checkpoint {step} in {mngr.directory} is corrupt or from another config ({type(e).__name__}): "
            "delete that step's folder to fall back to the previous one, or train into a new --out"
        ) from None


def save(mngr: Any, step: int, state: Any) -> None:
    import orbax.checkpoint as ocp

    mngr.save(step, args=ocp.args.StandardSave(state))


def step_of(state: Any) -> int:
    """The state's step (bagging stacks one per member, all equal)."""
    return int(np.ravel(jax.device_get(state.step))[0])
