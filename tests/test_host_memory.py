"""jmp_jax.host_memory: once jmp_jax is imported, XLA CPU's worker threads allocate from one malloc arena."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jmp_jax import host_memory

# Runs jitted calls on XLA's worker threads, then counts glibc's arenas (the <heap nr=...> entries of
# malloc_info). Each thread that allocates gets an arena of its own unless the arenas are capped.
_PROBE = """
import ctypes, json, os, re, sys, tempfile
if sys.argv[1] == "import_first":
    import jmp_jax
import jax, jax.numpy as jnp
if sys.argv[1] == "import_late":
    jnp.zeros(1).block_until_ready()
    import jmp_jax
f = jax.jit(lambda x: jnp.sum(jnp.exp(x) @ jnp.exp(x).T))
for n in (64, 256, 512):
    f(jnp.ones((n, n), jnp.float32)).block_until_ready()
libc = ctypes.CDLL("libc.so.6")
libc.fdopen.restype = ctypes.c_void_p
with tempfile.TemporaryFile("w+") as out:
    stream = libc.fdopen(os.dup(out.fileno()), b"w")
    libc.malloc_info(0, ctypes.c_void_p(stream))
    libc.fclose(ctypes.c_void_p(stream))
    out.seek(0)
    print(json.dumps({"arenas": len(re.findall(r"<heap nr=", out.read()))}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")


def _arenas(mode: str, opt_out: bool = False) -> tuple[int, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    env.pop(host_memory.OPT_OUT_ENV, None)
    if opt_out:
        env[host_memory.OPT_OUT_ENV] = "1"
    run = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["arenas"], run.stderr


def test_worker_threads_share_one_arena_when_imported_before_jax_runs():
    one, _ = _arenas("import_first")
    system, _ = _arenas("import_first", opt_out=True)
    assert one == 1
    assert system > 1, system  # glibc's default: XLA's threads took arenas of their own


def test_warns_when_jax_started_first():
    arenas, stderr = _arenas("import_late")
    assert "imported after jax started its CPU client" in stderr
    assert arenas > 1


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "1")
    assert host_memory.use_one_malloc_arena() is False


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_free_pages_inside_the_heap_go_back_to_the_system():
    # Small blocks, freed but for every 64th, leave free pages that free() keeps (they are not at the top).
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    blocks = [libc.malloc(2048) for _ in range(40_000)]
    for block in blocks:
        ctypes.memset(block, 1, 2048)  # touched, so resident
    for i, block in enumerate(blocks):
        if i % 64:
            libc.free(ctypes.c_void_p(block))
    held = _rss_bytes()
    assert host_memory.release_free_pages()
    assert held - _rss_bytes() > 40 * 2**20, (held, _rss_bytes())
    for block in blocks[::64]:
        libc.free(ctypes.c_void_p(block))


def test_each_long_compile_is_followed_by_one_trim(monkeypatch):
    import jax
    import jax.numpy as jnp

    import jmp_jax.models  # noqa: F401  (registers the trim, as every program that compiles a model does)
    compiles, trims = [], []

    def count_compiles(event: str, seconds: float, **_) -> None:
        if event == host_memory._BACKEND_COMPILE_EVENT:
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(count_compiles)
    try:
        monkeypatch.setattr(host_memory, "release_free_pages", lambda: trims.append(1) or True)
        monkeypatch.setattr(host_memory, "TRIM_AFTER_COMPILE_S", 0.0)
        assert host_memory.trim_after_compiles()  # a second registration adds no second trim
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(np.ones(7, np.float32)).block_until_ready()
        assert len(compiles) >= 1 and len(trims) == len(compiles), (compiles, trims)
        monkeypatch.setattr(host_memory, "TRIM_AFTER_COMPILE_S", 3600.0)
        jax.jit(lambda x: jnp.cos(x) * 3.0 + 1.25)(np.ones(7, np.float32)).block_until_ready()
        assert len(compiles) > len(trims)  # short compiles leave the heap alone
    finally:
        jax.monitoring.unregister_event_duration_listener(count_compiles)
