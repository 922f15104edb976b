"""Keep freed host memory in the process, so XLA CPU's per-step temporaries are not re-faulted each step.

XLA CPU allocates all temporaries of one execution as a single block (6.7 GB for the JMP-S loss gradient
on the bench's slab batch) from a worker thread. glibc serves a block that large from the thread's arena by
mmap and unmaps it when freed, so every step touches fresh pages. With one arena, no mmap and no trimming,
the block stays mapped after the first step: `bench/bench_model.py --precision bfloat16` measured 1.74
million page faults and 9.1 s per slab step with glibc's defaults, 30 thousand and 5.9 s with this.

Trade-off: the process keeps its peak host memory until it exits, and a heap that never unmaps can
fragment: with every block's intermediates kept (model.remat="none") the slab step's process peaked at 19.2
GB, against 11.2 GB with glibc's defaults; with recomputed blocks (the default) at 5.5 GB, against 5.9 GB.
Set JMP_JAX_SYSTEM_MALLOC=1 to keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

OPT_OUT_ENV = "JMP_JAX_SYSTEM_MALLOC"

# mallopt parameters (glibc malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _jax_backend_started() -> bool:
    """Whether jax has created its clients (and so the CPU worker threads); never imports jax itself."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)  # a private jax helper: may go away
    return started is not None and started()


def retain_freed_host_memory() -> bool:
    """Route all host allocations through glibc's main arena and never return freed memory to the OS.

    Returns whether the setting was applied: False where the C library has no `mallopt` (not glibc),
    or when JMP_JAX_SYSTEM_MALLOC=1. It only helps threads that allocate after it runs, so it must run
    before jax starts its CPU client; `import jmp_jax` calls it, and warns when jax had already started.
    """
    if os.environ.get(OPT_OUT_ENV, "0") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    # Arena first: a thread attaches to an arena at its first allocation, and keeps it.
    applied = all(mallopt(param, value) == 1 for param, value in
                  ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    if applied and _jax_backend_started():
        logging.getLogger(__name__).warning(
            "jmp_jax was imported after jax started its CPU client: XLA's host temporaries will be "
            "re-faulted on every step. Import jmp_jax before running any jax computation.")
    return applied
