"""Settings for the whole test session, applied before any test module imports jax.

The suite's time goes mostly into XLA compiles of small programs that then run a few steps, so cheaper
backend optimisation saves more compile time than it costs at run time. Subprocesses inherit it.
"""
import os

FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAGS}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
