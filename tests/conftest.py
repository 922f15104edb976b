"""Settings for the whole test session, applied before any test module imports jax, and its skip policy.

The suite's time goes mostly into XLA compiles of small programs that then run a few steps, so cheaper
backend optimisation saves more compile time than it costs at run time. Subprocesses inherit it.

A test skipped because a file is missing is reported as failed: the fixtures live in the repository, so a
missing one means the suite would pass without checking what it claims (test_skip_policy.py). The only
exception: outside CI, tests of the real public data samples skip where ../shared/data is absent
(`fixture_files.data_path`).
"""
import os

import pytest

from fixture_files import MISSING_FILE_REASON, PUBLIC_SAMPLES_ABSENT
from fixture_pretrain import four_devices, pretrain_env  # noqa: F401 (session fixtures of the pre-training runs)

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    reason = report.longrepr[2] if report.skipped and isinstance(report.longrepr, tuple) else ""
    allowed = PUBLIC_SAMPLES_ABSENT in reason and not os.environ.get("CI")
    if MISSING_FILE_REASON.search(reason) and not allowed:
        report.outcome = "failed"
        report.longrepr = f"{report.longrepr[2]}: tests may not skip for a missing file (tests/fixtures/README.md)"
