"""Shared helpers of the benchmarks: machine description, timing, matmul peak, BENCHMARKS.md output."""
from __future__ import annotations

import datetime
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

BENCHMARKS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "BENCHMARKS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}; {os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable; jax {jax.__version__} "
            f"on {jax.default_backend()} ({devices}); load average at the end {load}")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` (which must block until done) over `repeats` calls, in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, repeats: int = 10, dtype=jnp.float32) -> float:
    """This machine's measured matmul rate through XLA (GFLOP/s), the yardstick for the model.

    Operands in `dtype`, accumulation in float32 (bfloat16 is how the model's bf16 products run).
    """
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
    f(a).block_until_ready()
    ms = median_ms(lambda: f(a).block_until_ready(), repeats)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def stage(message: str) -> None:
    """Progress on stderr, so a long benchmark shows where its time goes."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minor_page_faults() -> int:
    """Minor page faults of this process so far (a fresh page touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=os.path.dirname(BENCHMARKS_MD)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# Environment variables that change what a bench measures; a report's command line shows them when set.
COMMAND_ENV = ("JMP_JAX_SYSTEM_MALLOC", "XLA_FLAGS")


def report(title: str, text: str, notes: str = "", append: bool = True) -> None:
    """Prints the table and appends it (unless `append` is False), with the machine and the command, to
    BENCHMARKS.md."""
    settings = [f"{name}={shlex.quote(os.environ[name])} " for name in COMMAND_ENV if os.environ.get(name)]
    command = "".join(settings) + "python " + " ".join(shlex.quote(a) for a in sys.argv)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    block = (f"\n## {title}\n\n- when: {stamp}, commit {git_revision()}\n- machine: {machine()}\n"
             f"- command: `{command}`\n\n{text}\n" + (f"\n{notes}\n" if notes else ""))
    print(block)
    if append:
        with open(BENCHMARKS_MD, "a") as f:
            f.write(block)
