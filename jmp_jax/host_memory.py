"""Host memory of XLA processes: one malloc arena for every thread, so XLA CPU's worker threads do not each
keep a heap of their own, and free pages handed back after each long compile.

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
fragmented: 6.85 GB for the same slab step.

An XLA compile leaves the heap full of freed blocks (the compiler's own memory) that free() does not hand
back, since they are not at the heap's top; the step that runs next then maps its temporaries on top of
them. `trim_after_compiles` hands the free pages back after each compile of over a second (malloc_trim:
0.07-0.2 s after a JMP-S compile of 3-95 s). Measured on the JMP-S slab step with bf16 products
(BENCHMARKS.md "Host memory after compiles"): peak RSS 3.91 -> 3.66 GB.

Set JMP_JAX_SYSTEM_MALLOC=1 to keep glibc's defaults (neither setting applies).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys

OPT_OUT_ENV = "JMP_JAX_SYSTEM_MALLOC"

_M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
# jax's monitoring event at the end of each XLA compile (or persistent-cache read), with its duration.
_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRIM_AFTER_COMPILE_S = 1.0  # smaller compiles leave little behind; trimming after each would add up
_trimming = False


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
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    applied = mallopt(_M_ARENA_MAX, 1) == 1
    if applied and _jax_backend_started():
        logging.getLogger(__name__).warning(
            "jmp_jax was imported after jax started its CPU client: XLA's worker threads keep their own "
            "malloc arenas. Import jmp_jax before running any jax computation.")
    return applied


@functools.cache
def _c_library() -> ctypes.CDLL | None:
    """The process's C library, loaded once (find_library runs ldconfig); None where it cannot be loaded."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _libc_function(name: str):
    """The C library's `name`, or None (not glibc, or opted out with JMP_JAX_SYSTEM_MALLOC=1)."""
    if os.environ.get(OPT_OUT_ENV, "0") not in ("", "0"):
        return None
    return getattr(_c_library(), name, None)


def release_free_pages() -> bool:
    """Hand every free page of the malloc heap back to the system (glibc's malloc_trim(0)); False where
    that is not available or opted out."""
    malloc_trim = _libc_function("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))


def trim_after_compiles() -> bool:
    """From now on, hand the heap's free pages back to the system after every XLA compile that took over
    TRIM_AFTER_COMPILE_S seconds (module docstring). Idempotent; imports jax. Returns whether it applies
    (False where the C library has no `malloc_trim`, or with JMP_JAX_SYSTEM_MALLOC=1)."""
    global _trimming
    if _libc_function("malloc_trim") is None:
        return False
    if not _trimming:
        import jax.monitoring

        def after_compile(event: str, seconds: float, **_) -> None:
            if event == _BACKEND_COMPILE_EVENT and seconds > TRIM_AFTER_COMPILE_S:
                release_free_pages()

        jax.monitoring.register_event_duration_secs_listener(after_compile)
        _trimming = True
    return True
