"""`jmp_jax.compilation_cache`: where the CLIs' persistent XLA cache and traced-program store live, the
switches that turn them off, and that a second process reads back what the first traced and compiled (CPU,
this jax version)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jmp_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Enables the cache as an entry point does, compiles a small program as the loops do (through the program
# store) and counts the cache's hits and misses and the program's tracings.
_PROBE = """
import collections, json, jax, jax.numpy as jnp
from jax import monitoring
from jmp_jax import compilation_cache, program_store
events = collections.Counter()
monitoring.register_event_listener(lambda event, **kw: events.update([event.rsplit("/", 1)[-1]]))
path = compilation_cache.enable()
def program(x):
    events["traced"] += 1
    return jnp.sin(x) @ x.T
program_store.jit(program, name="probe", key=0)(jnp.ones((8, 8))).block_until_ready()
print(json.dumps({"dir": path, "store": program_store.directory(), "traced": events["traced"],
                  "hits": events["cache_hits"], "misses": events["cache_misses"]}))
"""


@pytest.fixture
def clean_env(monkeypatch):
    """No cache setting inherited from the suite (conftest) or the user."""
    for name in (compilation_cache.CACHE_ENV, "JAX_COMPILATION_CACHE_DIR", "XDG_CACHE_HOME",
                 "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_COMPILATION_CACHE_MAX_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_directory_settings_in_order(clean_env, tmp_path):
    clean_env.setenv("HOME", str(tmp_path / "home"))
    assert compilation_cache.cache_dir() == str(tmp_path / "home" / ".cache" / "jmp_jax" / "xla")
    clean_env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compilation_cache.cache_dir() == str(tmp_path / "xdg" / "jmp_jax" / "xla")
    clean_env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compilation_cache.cache_dir() == str(tmp_path / "jax")
    clean_env.setenv(compilation_cache.CACHE_ENV, str(tmp_path / "mine"))
    assert compilation_cache.cache_dir() == str(tmp_path / "mine")
    for off in ("off", "0", "False", "no"):
        clean_env.setenv(compilation_cache.CACHE_ENV, off)
        assert compilation_cache.cache_dir() is None


def _probe(env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_second_process_reads_the_first_ones_program(clean_env, tmp_path):
    """Also a program that compiles in milliseconds (the probe's): enable() keeps every program."""
    cache = tmp_path / "xdg" / "jmp_jax" / "xla"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONPATH": REPO}
    store = str(cache / compilation_cache.PROGRAMS_SUBDIR)
    first = _probe(env)
    assert first["dir"] == str(cache) and first["store"] == store, first
    assert first["traced"] == 1 and first["hits"] == 0 and first["misses"] >= 1, first
    assert os.listdir(cache) and len(os.listdir(store)) == 1, "the first run wrote no cache entry or program"
    assert _probe(env) == {"dir": str(cache), "store": store, "traced": 0, "hits": first["misses"], "misses": 0}
    # Only the store off: the program is traced again (plain jax.jit), with the XLA cache on.
    store_off = _probe({**env, compilation_cache.PROGRAM_STORE_ENV: "off"})
    assert store_off["dir"] == str(cache) and store_off["store"] is None and store_off["traced"] == 1, store_off


def test_off_switch_creates_nothing_and_reads_nothing(clean_env, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), compilation_cache.CACHE_ENV: "off",
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "PYTHONPATH": REPO}
    assert _probe(env) == {"dir": None, "store": None, "traced": 1, "hits": 0, "misses": 0}
    assert not (tmp_path / "xdg").exists()


def test_eviction_removes_least_recently_used_entries_beyond_the_bound(tmp_path):
    """Oldest-used jax entries (and their access-time files) go first, until the rest fit; nothing else in the
    folder is touched."""
    def entry(name: str, size: int, used: float) -> None:
        (tmp_path / f"{name}-cache").write_bytes(b"x" * size)
        (tmp_path / f"{name}-atime").write_bytes(b"t")
        os.utime(tmp_path / f"{name}-cache", (used, used))

    for name, used in (("read_recently", 4000.0), ("oldest", 1000.0), ("newest", 5000.0), ("older", 2000.0)):
        entry(name, 100, used)
    (tmp_path / "traced_programs").mkdir()
    (tmp_path / "traced_programs" / "probe-0.jaxexport").write_bytes(b"y" * 1000)
    compilation_cache.evict_least_recent(str(tmp_path), 250)
    assert sorted(os.listdir(tmp_path)) == ["newest-atime", "newest-cache", "read_recently-atime",
                                            "read_recently-cache", "traced_programs"]
    assert os.listdir(tmp_path / "traced_programs") == ["probe-0.jaxexport"]
    compilation_cache.evict_least_recent(str(tmp_path), 200)  # within the bound: nothing goes
    assert len(os.listdir(tmp_path)) == 5


def test_a_folder_that_cannot_be_trimmed_is_reported_and_used(clean_env, tmp_path, capsys):
    import jax

    from jmp_jax import program_store
    settings = {}
    clean_env.setattr(jax.config, "update", lambda name, value: settings.__setitem__(name, value))  # this process
    clean_env.setattr(program_store, "enable", lambda directory: None)                          # keeps its own

    def unreadable(path):
        raise PermissionError(13, "Permission denied", path)

    clean_env.setattr(compilation_cache.os, "scandir", unreadable)
    clean_env.setenv(compilation_cache.CACHE_ENV, str(tmp_path))
    assert compilation_cache.enable() == str(tmp_path)
    assert capsys.readouterr().err == f"warning: compilation cache not trimmed: {tmp_path}: Permission denied\n"
    assert settings["jax_enable_compilation_cache"] and settings["jax_compilation_cache_max_size"] == -1
