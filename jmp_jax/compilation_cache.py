"""jax's persistent compilation cache for the command-line entry points: a program compiled by an earlier
run (same model, batch shape, jax version and XLA flags) is read back from disk instead of compiled again.

    from jmp_jax import compilation_cache
    compilation_cache.enable()  # in an entry point, before its first compile; never at library import

Where (first that applies):
  JMP_JAX_COMPILATION_CACHE=off      no persistent cache (also 0, false, no)
  JMP_JAX_COMPILATION_CACHE=DIR      DIR
  JAX_COMPILATION_CACHE_DIR=DIR      jax's own setting (the test suite shares one directory this way)
  $XDG_CACHE_HOME/jmp_jax/xla        default; ~/.cache/jmp_jax/xla without XDG_CACHE_HOME

Traced programs (`jmp_jax.program_store`: jax's tracing skipped on a restart) are kept beside it, in
`<directory>/traced_programs`, and are off with it; JMP_JAX_PROGRAM_STORE=off turns off only them (e.g.
after editing an installed dependency in place, which the store's key does not see).

The cache is bounded: `enable()` evicts the least recently used entries beyond MAX_SIZE_BYTES, once per
process. jax's own bound (JAX_COMPILATION_CACHE_MAX_SIZE, used instead where set) scans the whole directory
under a lock on every write, 0.1-0.15 s per program at 2,400 entries, and a start can write hundreds.
It keeps every program, also those that compile in
milliseconds (unless JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise): the eager variable init
compiles hundreds of them on every start, which jax's default (programs that took >= 1 s) would not keep.
"""
from __future__ import annotations

import contextlib
import os
import sys

CACHE_ENV = "JMP_JAX_COMPILATION_CACHE"
PROGRAM_STORE_ENV = "JMP_JAX_PROGRAM_STORE"
OFF_VALUES = ("off", "0", "false", "no")
# A JMP-S training step compiles to ~10-50 MB: room for the shapes of several runs and sizes.
MAX_SIZE_BYTES = 4 << 30
PROGRAMS_SUBDIR = "traced_programs"  # jax's cache only counts and evicts its own top-level "*-cache" files
ENTRY_SUFFIX, JAX_ACCESS_TIME_SUFFIX = "-cache", "-atime"  # jax's file names: an entry, its access time


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jmp_jax", "xla")


def cache_dir() -> str | None:
    """The directory the settings above choose, or None when the cache is off."""
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in OFF_VALUES:
        return None
    return setting or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir()


def enable() -> str | None:
    """Turns the persistent cache on (or off) in this process as the settings say; returns its directory.

    An unwritable directory leaves the cache off with a one-line warning: a cache never stops a run.
    """
    import jax

    from jmp_jax import program_store

    path = cache_dir()
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            print(f"warning: compilation cache off: cannot create {path}: {err.strerror}", file=sys.stderr)
            path = None
    if path is None:
        jax.config.update("jax_enable_compilation_cache", False)
        program_store.enable(None)
        return None
    store_off = os.environ.get(PROGRAM_STORE_ENV, "").strip().lower() in OFF_VALUES
    program_store.enable(None if store_off else os.path.join(path, PROGRAMS_SUBDIR))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", -1)  # no scan per write: bounded here instead
        try:
            evict_least_recent(path, MAX_SIZE_BYTES)
        except OSError as err:
            print(f"warning: compilation cache not trimmed: {path}: {err.strerror}", file=sys.stderr)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def evict_least_recent(path: str, max_bytes: int) -> None:
    """Deletes jax's cache entries in `path`, least recently used first, until they total <= max_bytes.

    Recency is the later of a file's access and modification times (reads update the access time on most
    mounts, at least daily). Entries another process deletes meanwhile are skipped.
    """
    entries, total = [], 0
    with os.scandir(path) as found:
        for entry in found:
            if entry.name.endswith(ENTRY_SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    entries.append((max(stat.st_atime, stat.st_mtime), stat.st_size, entry.path))
                    total += stat.st_size
    for _, size, entry_path in sorted(entries):
        if total <= max_bytes:
            break
        for name in (entry_path, entry_path.removesuffix(ENTRY_SUFFIX) + JAX_ACCESS_TIME_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(name)
        total -= size
