r"""Cost of writing new programs into a full persistent compilation cache: jax's own size bound against
`jmp_jax.compilation_cache`'s (one eviction pass when a process enables the cache).

  python bench/bench_cache_writes.py                     # 2,400 existing entries, JMP-S eager init
  python bench/bench_cache_writes.py --entries 8000 --config demo

jax's bound (`JAX_COMPILATION_CACHE_MAX_SIZE`) lists and stats every entry, and reads its access-time file,
under a lock, before each write. The measured work is what a run with a new model or size does first: the
eager variable init, which compiles (and caches) a few hundred small programs. Each measurement is a fresh
process on a fresh copy of a cache of `--entries` synthetic entries (40 KB each, with jax's access-time
files), so that both bounds start from the same folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = """
import json, sys, time
from jmp_jax import compilation_cache
compilation_cache.enable()
from jmp_jax.models import config as config_lib
from jmp_jax.models.jmp import JMPModel
from jmp_jax.training.state import init_variables
start = time.time()
init_variables(JMPModel(config_lib.NAMED_CONFIGS[sys.argv[1]](), num_tasks=4), 0, "none", sys.argv[1])
print(json.dumps({"init_s": time.time() - start}))
"""


def synthetic_cache(path: str, entries: int) -> None:
    """`entries` jax-style cache files (and access-time files) of 40 KB."""
    os.makedirs(path)
    payload = os.urandom(40_000)
    for i in range(entries):
        with open(os.path.join(path, f"jit_synthetic-{i:064x}-cache"), "wb") as f:
            f.write(payload)
        with open(os.path.join(path, f"jit_synthetic-{i:064x}-atime"), "wb") as f:
            f.write(time.time_ns().to_bytes(8, "little"))


def measure(template: str, workdir: str, config: str, jax_bound: bool) -> tuple[float, int]:
    """(seconds of the eager init, entries written) in a fresh process on a copy of `template`."""
    cache = os.path.join(workdir, "cache")
    shutil.rmtree(cache, ignore_errors=True)
    shutil.copytree(template, cache)
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_MAX_SIZE", "XLA_FLAGS")}
    env.update(JMP_JAX_COMPILATION_CACHE=cache, JAX_PLATFORMS="cpu")
    if jax_bound:
        env["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(4 << 30)
    done = subprocess.run([sys.executable, "-c", MEASURE, config], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    written = sum(name.endswith("-cache") for name in os.listdir(cache)) - sum(
        name.endswith("-cache") for name in os.listdir(template))
    return json.loads(done.stdout.splitlines()[-1])["init_s"], written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=2400)
    parser.add_argument("--config", default="jmp_s")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-report", action="store_true", help="print the table, do not append it")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    from bench import common
    workdir = tempfile.mkdtemp(prefix="bench_cache_writes-")
    rows = []
    try:
        template = os.path.join(workdir, "template")
        synthetic_cache(template, args.entries)
        for name, jax_bound in (("jax's bound (JAX_COMPILATION_CACHE_MAX_SIZE=4 GiB)", True),
                                ("jmp_jax.compilation_cache (one pass at enable)", False)):
            runs = [measure(template, workdir, args.config, jax_bound) for _ in range(args.repeats)]
            common.stage(f"{name}: {runs}")
            rows.append([name, f"{args.entries:,}", runs[0][1], ", ".join(f"{s:.1f}" for s, _ in runs)])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = common.table(["cache bound", "entries before", "entries written", f"{args.config} eager init s"], rows)
    common.report("bench_cache_writes: new programs written into a full compilation cache", text,
                  append=not args.no_report)


if __name__ == "__main__":
    main()
