"""One malloc arena for every thread, so XLA CPU's worker threads do not each keep a heap of their own.

glibc gives each thread that allocates an arena of its own (up to 8 per core). XLA CPU runs a step's
kernels on a pool of worker threads, which allocate and free buffers of every size, and an arena keeps what
its thread freed for that thread's next allocations: the freed memory of one arena cannot serve another's,
so the process holds several partly empty heaps. With one arena, blocks above glibc's mmap threshold (XLA's
per-step temporaries: one block of about 2 GB for the JMP-S slab gradient) are still mapped for the step and
unmapped after, and everything smaller shares one heap. Measured (`bench/sidebyside.py step`, JMP-S, peak
RSS of the process, BENCHMARKS.md "Host memory"): slab step 5.12 GB with glibc's defaults, 4.41 GB with one
arena; molecule step 3.43 and 2.91 GB; step times equal within 3%.

An earlier setting also kept every freed block mapped (no mmap, no trimming) to save the page faults of
re-mapping the temporaries; once the temporaries shrank it no longer made the steps faster, and its heap
fragmented: 6.85 GB for the same slab step. Set JMP_JAX_SYSTEM_MALLOC=1 to keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

OPT_OUT_ENV = "JMP_JAX_SYSTEM_MALLOC"

_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)


def _jax_backend_started() -> bool:
    """Whether jax has created its clients (and so the CPU worker threads); never imports jax itself."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    started = getattr(bridge, "backends_are_initialized", None)  # a private jax helper: may go away
    return started is not None and started()


def use_one_malloc_arena() -> bool:
    """Make every thread that has not yet allocated use glibc's main arena.

    Returns whether the setting was applied: False where the C library has no `mallopt` (not glibc), or when
    JMP_JAX_SYSTEM_MALLOC=1. A thread attaches to an arena at its first allocation and keeps it, so this must
    run before jax starts its CPU client; `import jmp_jax` calls it, and warns when jax had already started.
    """
    if os.environ.get(OPT_OUT_ENV, "0") not in ("", "0"):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    applied = mallopt(_M_ARENA_MAX, 1) == 1
    if applied and _jax_backend_started():
        logging.getLogger(__name__).warning(
            "jmp_jax was imported after jax started its CPU client: XLA's worker threads keep their own "
            "malloc arenas. Import jmp_jax before running any jax computation.")
    return applied
