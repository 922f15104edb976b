"""jmp_jax.host_memory: XLA CPU temporaries stop page-faulting after the first call once jmp_jax is imported."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jmp_jax import host_memory

# A jitted call whose only large buffer is a 64 MiB temporary (exp(x), read in two orders): the fewest page
# faults of one call, over eight calls after four warm-up calls (a call can start before the previous
# call's temporary is freed, and then takes a new block, until the heap holds enough freed blocks).
_PROBE = """
import json, resource, sys
if sys.argv[1] == "import_first":
    import jmp_jax
import jax, jax.numpy as jnp
if sys.argv[1] == "import_late":
    jnp.zeros(1).block_until_ready()
    import jmp_jax
f = jax.jit(lambda x: jnp.sum(jnp.exp(x) * jnp.exp(x)[::-1]))
x = jnp.ones(16 * 2**20, jnp.float32)
for _ in range(4):
    f(x).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"faults": min(faults)}))
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")


def _fewest_faults_of_a_call(mode: str, opt_out: bool = False) -> tuple[int, str]:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop(host_memory.OPT_OUT_ENV, None)
    if opt_out:
        env[host_memory.OPT_OUT_ENV] = "1"
    run = subprocess.run([sys.executable, "-c", _PROBE, mode], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(run.stdout.strip().splitlines()[-1])["faults"], run.stderr


def test_temporaries_stay_mapped_when_imported_before_jax_runs():
    pages_of_temp = 64 * 2**20 // 4096
    retained, _ = _fewest_faults_of_a_call("import_first")
    system, _ = _fewest_faults_of_a_call("import_first", opt_out=True)
    assert system > pages_of_temp // 2, system          # glibc's default: the temporary is re-faulted
    assert retained < pages_of_temp // 20, retained     # retained: next to no faults


def test_warns_when_jax_started_first():
    _, stderr = _fewest_faults_of_a_call("import_late")
    assert "imported after jax started its CPU client" in stderr


def test_opt_out_leaves_malloc_alone(monkeypatch):
    monkeypatch.setenv(host_memory.OPT_OUT_ENV, "1")
    assert host_memory.retain_freed_host_memory() is False
