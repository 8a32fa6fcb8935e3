"""Device meshes and partition specs: axes "ensemble" (members/stages or latents) and "data" (batch rows).

Layout (one rule per kind of state, see `state_specs`):
  stacked state (bagging members, boosting stages: leaves with a leading [J] axis), E = ensemble size
      params, optimizer state (Adam moments AND counts), dead-latent counters
                                      P("ensemble")   when E divides J: member j on shard j // (J/E)
                                      otherwise (E > J) each member's latent axis split as below,
                                      with a leading None (Adam counts then replicated)
      step, scale                     P()             tiny; replicated so every host can read them
  single / expanded SAE (no member axis)
      W_enc [D, M]                    P(None, "ensemble")   the latent dim split over "ensemble"
      W_dec [M, D]                    P("ensemble", None)   (model parallel for a wide SAE; when M
      b_enc, thresholds, since_fired  P("ensemble")          does not divide, replicated)
      b_dec, step, scale              P()
  batch x [B, D]                      P("data")       rows split over "data", replicated over "ensemble"
  metrics                             P()             replicated: any host can log them

Bagging members never talk to each other, so a mesh (J, 1) trains with no cross-device traffic
except the batch broadcast; the "data" axis splits each member's batch and XLA inserts the
all-reduce of its gradients. Axes are `AxisType.Auto`: jit propagates the NamedShardings of its
inputs (GSPMD), and `shard_method` pins the outputs to the same layout, so the state keeps its
sharding step after step.

Multi-host: every process runs the same program (`initialize_distributed` first). The state is
placed from identical host values on every process; each process gathers ONLY the batch rows that
its own devices hold (`source_batch`, from the pure data order `batch_indices`) and
`jax.make_array_from_process_local_data` assembles the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from saeens.errors import SaeensError

AXES = ("ensemble", "data")
STACKED_METHODS = ("bagging", "boosting", "sweep")  # methods whose state stacks J members/stages on axis 0
_REPLICATED_FIELDS = ("step", "scale")  # TrainState fields never sharded
_LATENT_SPECS = {  # single/expanded SAE: where the latent axis M sits in each params-shaped leaf
    "W_enc": P(None, "ensemble"),
    "W_dec": P("ensemble", None),
    "b_enc": P("ensemble"),
    "log_threshold": P("ensemble"),
    "threshold": P("ensemble"),
}


# ---------------------------------------------------------------------------------------- mesh


def make_mesh(ensemble: int, data: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh of ensemble x data devices with axes ("ensemble", "data"), both `AxisType.Auto`.

    devices=None takes all of `jax.devices()` (every process's, in multi-host runs) and lets
    `jax.make_mesh` order them for the physical topology (ICI rings on TPU). Pass devices to fix
    the order yourself; their number must equal ensemble * data.
    """
    if ensemble < 1 or data < 1:
        raise SaeensError(f"mesh axes must be >= 1, got ensemble={ensemble}, data={data}")
    given = devices
    devices = list(jax.devices() if devices is None else devices)
    if ensemble * data != len(devices):
        raise SaeensError(
            f"a mesh of ensemble={ensemble} x data={data} needs {ensemble * data} devices but "
            f"{'1 device is' if len(devices) == 1 else f'{len(devices)} devices are'} given: choose axis sizes whose "
            "product is the device count"
        )
    auto = (AxisType.Auto, AxisType.Auto)
    if given is None:
        return jax.make_mesh((ensemble, data), AXES, axis_types=auto, devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(ensemble, data), AXES, axis_types=auto)


def default_mesh(members: int, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """ensemble = the largest divisor of J that divides the device count, data = the rest.

    J=8 on 8 chips -> (8, 1); J=8 on 256 -> (8, 32); J=4 on 8 -> (4, 2); J=1 (single/expanded)
    -> (1, n), pure data parallel (pass make_mesh(n, 1) instead to split a wide SAE's latents).
    """
    n = len(jax.devices() if devices is None else devices)
    ensemble = math.gcd(max(1, members), n)
    return make_mesh(ensemble, n // ensemble, devices)


def is_stacked(method: str) -> bool:
    """Whether a method's train state stacks its members/stages on a leading axis."""
    return method in STACKED_METHODS


# ------------------------------------------------------------------------------------ the state


def _field(path) -> str | None:
    """The TrainState field a leaf belongs to (the first attribute name on its path)."""
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            return k.name
    return None


def _param_name(path) -> str | None:
    """The params key of a params-shaped leaf (params, Adam mu/nu): the last dict key on its path."""
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return names[-1] if names else None


def _latent_spec(path, shape: tuple[int, ...], n_ens: int, lead: int) -> P:
    """Split a params-shaped leaf's latent axis M over "ensemble" (lead = leading stacked axes)."""
    base = P("ensemble") if _field(path) == "since_fired" else _LATENT_SPECS.get(_param_name(path) or "")
    if base is None or len(base) + lead != len(shape):
        return P()  # b_dec, Adam counts, ...: replicated
    m_axis = lead + list(base).index("ensemble")
    return P(*([None] * lead), *base) if shape[m_axis] % n_ens == 0 else P()


def _leaf_spec(path, shape: tuple[int, ...], n_ens: int, stacked: bool) -> P:
    if _field(path) in _REPLICATED_FIELDS or len(shape) == 0:
        return P()
    if stacked and shape[0] % n_ens == 0:
        return P("ensemble")  # whole members/stages per ensemble shard
    # single/expanded SAE, or fewer members than ensemble shards: split each SAE's latents
    return _latent_spec(path, shape, n_ens, lead=1 if stacked else 0)


def state_specs(state: Any, mesh: Mesh, stacked: bool) -> Any:
    """PartitionSpecs for a train state (arrays or ShapeDtypeStructs), same tree structure."""
    n_ens = mesh.shape["ensemble"]
    return jax.tree_util.tree_map_with_path(lambda p, a: _leaf_spec(p, tuple(a.shape), n_ens, stacked), state)


def state_shardings(state: Any, mesh: Mesh, stacked: bool) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs(state, mesh, stacked),
                        is_leaf=lambda x: isinstance(x, P))


def _put(a: Any, s: NamedSharding) -> jax.Array:
    if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(s, a.ndim):
        return a  # already there (no copy, no transfer)
    if jax.process_count() > 1 and isinstance(a, jax.Array) and not a.is_fully_addressable:
        return jax.jit(lambda x: x, out_shardings=s)(a)  # global -> global: a collective reshard
    # host-local value (identical on every process) -> global array on the mesh
    return jax.device_put(a, s)


def place_state(state: Any, mesh: Mesh, stacked: bool) -> Any:
    """The state with every leaf on `mesh` with its `state_specs` sharding.

    In multi-host runs every process must pass the same values (init is deterministic in the key).
    """
    return jax.tree.map(_put, state, state_shardings(state, mesh, stacked))


def abstract_state(abstract: Any, mesh: Mesh, stacked: bool) -> Any:
    """ShapeDtypeStructs carrying the mesh's shardings: orbax restores straight onto this mesh,
    whatever the mesh (or device count) that saved the checkpoint."""
    shardings = state_shardings(abstract, mesh, stacked)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ------------------------------------------------------------------------------------- batches


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over "data", replicated over "ensemble"."""
    return NamedSharding(mesh, P("data"))


def _check_rows(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.shape["data"]:
        raise SaeensError(
            f"batch size {batch_size} does not split over a data axis of {mesh.shape['data']}: "
            "use a batch size that is a multiple of it"
        )


def place_batch(x_BD: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
    """A full batch held on the host (the same on every process) -> the global batch on the mesh."""
    _check_rows(x_BD.shape[0], mesh)
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(x_BD), x_BD.shape)


def process_blocks(mesh: Mesh, batch_size: int) -> list[tuple[int, int]]:
    """[lo, hi) blocks of the global batch that this process's devices hold, ascending (the order
    that `make_array_from_process_local_data` expects them in)."""
    _check_rows(batch_size, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size, 1))
    return sorted({(sl[0].start or 0, batch_size if sl[0].stop is None else sl[0].stop) for sl in index_map.values()})


def process_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """Positions in the global batch that this process's devices hold, in `process_blocks` order."""
    return np.concatenate([np.arange(lo, hi) for lo, hi in process_blocks(mesh, batch_size)])


def source_batch(source: Any, step: int, batch_size: int, seed: int, mesh: Mesh) -> jax.Array:
    """Global batch `step` of a BatchSource (saeens/data/source.py) on the mesh: this process asks
    the source only for its own rows, block by block; no host holds the whole batch."""
    blocks = process_blocks(mesh, batch_size)
    local_RD = np.concatenate([source.batch(step, batch_size, seed, slice(lo, hi)) for lo, hi in blocks])
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_RD, (batch_size, local_RD.shape[1]))


def gather_batch(
    acts: Any, idx_B: np.ndarray, mesh: Mesh, split: str = "train", check: Callable | None = None
) -> jax.Array:
    """The global batch `acts.gather(idx_B)` on the mesh, reading only this process's rows.

    idx_B is the global batch's row order (`batch_indices(n, B, seed, step)`, identical on every
    process); each host reads rows idx_B[process_rows] from its cache (local disk or a shared
    bucket) and the global array is assembled without any host holding all of it.
    """
    idx_B = np.asarray(idx_B)
    rows = process_rows(mesh, idx_B.shape[0])
    local_RD = acts.gather(idx_B[rows], split)
    if check is not None:  # e.g. NaN/Inf rows, named by shard and row (saeens/data/source.py: check_rows)
        check(local_RD, idx_B[rows])
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh), local_RD, (idx_B.shape[0], local_RD.shape[1])
    )


# ---------------------------------------------------------------------------------- host reads


def to_host(tree: Any) -> Any:
    """numpy copies of every leaf, also of arrays spread over other processes (a collective:
    every process must call it)."""
    from jax.experimental import multihost_utils

    def get(a):
        if not isinstance(a, jax.Array) or a.is_fully_addressable or a.is_fully_replicated:
            return np.asarray(jax.device_get(a))
        return np.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree.map(get, tree)


# ------------------------------------------------------------------------- sharded Method wrap


def _pinned(fn: Callable, mesh: Mesh, stacked: bool) -> Callable:
    """jit(fn) with donated state whose outputs are (state on its shardings, replicated rest)."""
    compiled: dict[Any, Callable] = {}
    replicated = NamedSharding(mesh, P())

    def call(state, *args):
        sig = (jax.tree.structure(state), tuple(tuple(a.shape) for a in jax.tree.leaves(state)))
        f = compiled.get(sig)
        if f is None:
            f = compiled[sig] = jax.jit(
                fn, out_shardings=(state_shardings(state, mesh, stacked), replicated), donate_argnums=0
            )
        return f(state, *args)

    return call


@functools.lru_cache(maxsize=32)
def shard_method(method: Any, mesh: Mesh, stacked: bool) -> Any:
    """The same Method with its state on `mesh`: init places the state, step keeps its layout
    (and returns replicated metrics), prepare re-places what it returns, to_ensemble reads the
    final state back to the host first (it is a collective in multi-host runs)."""
    prepare = enter = leave = None
    if method.prepare is not None:
        def prepare(state, step, sample):
            return place_state(method.prepare(state, step, sample), mesh, stacked)
    if method.enter is not None:  # boosting's stage trained alone: one SAE's layout between enter and leave
        def enter(state, stage):
            return place_state(method.enter(state, stage), mesh, False)

        def leave(state, stage, sub):
            return place_state(method.leave(state, stage, sub), mesh, stacked)

    return dataclasses.replace(
        method,
        init=lambda key, sample: place_state(method.init(key, sample), mesh, stacked),
        step=_pinned(method.step, mesh, stacked and method.enter is None),
        to_ensemble=lambda state: method.to_ensemble(to_host(state)),
        prepare=prepare, enter=enter, leave=leave,
    )


# ------------------------------------------------------------------------------------ multi-host


def initialize_distributed(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    cpu_collectives: str | None = "gloo",
    timeout_s: int = 300,
) -> None:
    """`jax.distributed.initialize`, before any other JAX call, on every process.

    coordinator "host:port" of process 0. On TPU pods and SLURM/Open MPI clusters all three may be
    None (JAX detects them). cpu_collectives="gloo" lets CPU devices of different processes run
    collectives (jax's CPU default is none); it does not affect TPU or GPU backends.
    """
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        initialization_timeout=timeout_s,
    )


def describe(mesh: Mesh) -> str:
    """One line for logs: shape, device kind, processes."""
    procs = len({d.process_index for d in mesh.devices.flat})
    kind = mesh.devices.flat[0].device_kind
    return f"mesh ensemble={mesh.shape['ensemble']} x data={mesh.shape['data']} ({math.prod(mesh.devices.shape)} {kind}, {procs} process(es))"
