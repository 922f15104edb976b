"""Settings for the whole test session, applied before any test module imports jax, and its skip policy.

The suite's time goes mostly into XLA compiles of small programs that then run a few steps, so cheaper
backend optimisation saves more compile time than it costs at run time, and XLA CPU's older fusion code
generator compiles in about half the time of its MLIR fusion emitters (the fine-tuning force step of a 1-block
demo model: 11.1 s -> 6.2 s, and it runs faster). Subprocesses inherit it.
Every compiled program also goes into one persistent XLA cache (`.pytest_cache/jax_compilation_cache`,
JAX_COMPILATION_CACHE_DIR overrides it) that the pytest-xdist workers and the CLIs tests launch share,
so a program compiles once, and a later run of the suite reads back what did not change.

A test skipped because a file is missing is reported as failed: the fixtures live in the repository, so a
missing one means the suite would pass without checking what it claims (test_skip_policy.py).
"""
import os

import pytest

from fixture_files import MISSING_FILE_REASON
from fixture_pretrain import finished_pretrain_run, pretrain_env  # noqa: F401 (once per test run)

FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                                   "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
    if MISSING_FILE_REASON.search(reason):
        report.outcome = "failed"
        report.longrepr = f"{report.longrepr[2]}: tests may not skip for a missing file (tests/fixtures/README.md)"
