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

ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


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
