"""Joining the other processes of a multi-process run (`jax.distributed`) before anything touches a device.

The coordinator address, process count and process id come from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES
and JAX_PROCESS_ID where set (a plain launch on any machines); what they leave unset, jax detects from the
cluster it runs on (SLURM, Open MPI, Cloud TPU pods, Kubernetes), as `jax.distributed.initialize()` does.
Without either, the run is one process.
"""
from __future__ import annotations

import os

import jax
from jax._src import clusters  # jax's own cluster detection, which initialize() without arguments uses
from jax._src.distributed import global_state as distributed_state  # its client; no public accessor

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# How long a process waits at a barrier for the others (their set-up: data indexes, budget planning, restore).
BARRIER_TIMEOUT_S = 3600


def cluster_detected() -> bool:
    """Whether jax recognises the environment as one of the clusters it reads its processes from."""
    return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types if not env.opt_in_only_method)


def initialize() -> bool:
    """Initialises `jax.distributed` when the environment names other processes; True when it is initialised.

    CPU devices of different processes talk through gloo (jax's CPU collectives) unless
    JAX_CPU_COLLECTIVES_IMPLEMENTATION chooses another.
    """
    if jax.distributed.is_initialized():
        return True
    address, count, index = (os.environ.get(name) or None for name in ENV_VARS)
    if not (address or count or index or cluster_detected()):
        return False
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=None if count is None else int(count),
                                   process_id=None if index is None else int(index))
    except ValueError as err:
        raise ValueError(f"jax.distributed: {err} (set {', '.join(ENV_VARS)}, or run under SLURM / a TPU pod)") from err
    return True


def barrier(name: str) -> None:
    """Waits until every process has reached `name` (nothing to wait for in a one-process run).

    Before their first collectives: a process that joins a new communicator more than ~30 s after its
    peers fails it (XLA's CPU collectives over gloo), and set-up times differ between processes.
    """
    if jax.process_count() > 1:
        distributed_state.client.wait_at_barrier(f"jmp_jax/{name}", BARRIER_TIMEOUT_S * 1000)
