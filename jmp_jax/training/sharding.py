"""Device mesh and shardings: data parallel over `data`, optional parameter sharding over `fsdp`.

A global batch is a stack of per-shard padded batches with a leading axis of length
`num_batch_shards` (a multiple of the mesh size), sharded over both mesh axes; the model is vmapped
over that axis. The result does not depend on how many devices hold the shards.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
# Parameters smaller than this stay replicated under fsdp: sharding them costs more in collectives than it saves.
FSDP_MIN_SIZE = 2**12


def make_mesh(fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over every device; `fsdp` devices share each parameter."""
    n = jax.device_count()
    if n % fsdp:
        raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
    # Auto axes: XLA propagates shardings through the model's gathers and scatters; explicit axes would
    # need an out_sharding on every indexing op.
    return jax.make_mesh((n // fsdp, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * len(DATA_AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch-shard) axis split over every device."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shards the largest dimension divisible by `fsdp` (big_vision's fsdp rule); small arrays replicate."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < FSDP_MIN_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for a train-state tree (params, optimiser state, EMA): fsdp where it applies."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)), abstract_state)


def local_batch_rows(mesh: Mesh, num_batch_shards: int) -> list[int]:
    """The batch shards (rows of the leading axis) that this process's devices hold, in order: the ones
    its input pipeline packs (all of them in a one-process run)."""
    indices = batch_sharding(mesh).addressable_devices_indices_map((num_batch_shards,))
    return sorted({row for index in indices.values() for row in range(*index[0].indices(num_batch_shards))})


def global_batch(local_shards: Any, mesh: Mesh) -> Any:
    """Builds global arrays from this process's stacked batch shards (leading axis = `local_batch_rows`).

    Works for one process and for multi-host runs after `jax.distributed.initialize()`.
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_shards)
