"""The suite's XLA flags: cheap compiles for the many small programs that run a step or two, and an
environment without them for the pre-training CLI runs, whose programs run long enough that optimised code
pays for itself.

Measured on a 2-core AMD EPYC (`python -m experiments.pretrain --config=configs/jmp_s.py:test` on 4 CPU
devices, a new persistent XLA cache, then the same run again reading it back): with FAST_COMPILE_FLAGS 79.7 s
and 63.8 s, with XLA's defaults 74.1 s and 40.2 s; the README's 2-step demo pre-training 70.8 / 39.3 s
against 58.0 / 31.3 s. The tiny rMD17 fine-tuning run (8 frames, one epoch) goes the other way: 50.5 s cold
with these flags, 79.6 s without, so fine-tuning runs keep them.
"""

# Optimisation level 0 and XLA CPU's older fusion code generator: the fine-tuning force step of a 1-block demo
# model compiles in 6.2 s instead of 11.1 s.
FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                      "--xla_cpu_use_fusion_emitters=false")


def without_fast_compile(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with FAST_COMPILE_FLAGS taken out of XLA_FLAGS (other flags kept)."""
    flags = environ.get("XLA_FLAGS", "").replace(FAST_COMPILE_FLAGS, " ")
    environ = dict(environ, XLA_FLAGS=" ".join(flags.split()))
    if not environ["XLA_FLAGS"]:
        del environ["XLA_FLAGS"]
    return environ
