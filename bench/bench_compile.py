r"""Compile time of the JMP-S pre-training step for one batch shape (tracing + lowering, then XLA), and
XLA's count of the step's temporary memory and work. The step is two programs, as the training loop runs
it (`state.SplitStep`): the gradient, compiled per batch shape, and the optimiser update, compiled once.

  python bench/bench_compile.py                          # JMP-S, molecule batch, unrolled blocks
  python bench/bench_compile.py --scan                   # one scanned interaction block
  python bench/bench_compile.py --remat none             # every block's intermediates kept for the backward pass
  python bench/bench_compile.py --compilation-cache      # as the CLIs run: run it twice, the 2nd reads back
                                                         # (traced programs and compiled executables)
  python bench/bench_compile.py --precision bfloat16     # bfloat16 matrix products, float32 activations

Nothing is executed: the state is abstract (jax.eval_shape), so the numbers are the compile alone. CPU
seconds of this process are reported next to wall seconds, since the machine may be shared.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_model import (alkane, cu_slab, make_batch, step_programs, timed,  # noqa: E402
                               timed_update_compile)
from jmp_jax import compilation_cache, program_store  # noqa: E402
from jmp_jax.graph.build import GraphSettings  # noqa: E402
from jmp_jax.models import config as config_lib  # noqa: E402
from jmp_jax.models.gemnet import REMAT_CHOICES, BlockExecution  # noqa: E402
from jmp_jax.models.jmp import JMPModel, placeholder_batch  # noqa: E402
from jmp_jax.training import optim  # noqa: E402
from jmp_jax.training.state import init_train_state  # noqa: E402

BATCHES = {
    "molecules": lambda: make_batch([alkane(7, s) for s in range(8)], GraphSettings.pretrain_molecule()),
    "slabs": lambda: make_batch([cu_slab("CO" if s % 2 == 0 else "OH", s) for s in range(4)],
                                GraphSettings.pretrain_periodic()),
}


def compile_times(name: str, backbone: config_lib.BackboneConfig, execution: BlockExecution) -> list:
    batch = BATCHES[name]()
    model = JMPModel(backbone, num_tasks=1, execution=execution)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), placeholder_batch()))
    settings = dict(num_blocks=backbone.num_blocks, peak_lr=3e-4, warmup_steps=2000, total_steps=100_000)
    tx, schedule = optim.pretrain_optimizer(variables["params"], **settings)
    state = jax.eval_shape(functools.partial(init_train_state, tx=tx), variables)
    gradient, update = step_programs(model, tx, schedule, optimizer_key=sorted(settings.items()))
    common.stage(f"{name}: lowering and compiling the gradient (per batch shape)")
    lowered, lower_s, lower_cpu = timed(lambda: gradient.lower(state.params, state.constants, batch))
    compiled, compile_s, compile_cpu = timed(lowered.compile)
    common.stage(f"{name}: lowering and compiling the optimiser update (once per run)")
    _, update_s, update_cpu = timed_update_compile(update, gradient, state, batch)
    # XLA's own accounting: the gradient's temporaries (what remat trades for recomputation) and its work.
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    gflop = compiled.cost_analysis().get("flops", float("nan")) / 1e9
    return [name, f"{lower_s:.1f} ({lower_cpu:.1f})", f"{compile_s:.1f} ({compile_cpu:.1f})",
            f"{lower_s + compile_s:.1f} ({lower_cpu + compile_cpu:.1f})", f"{update_s:.1f} ({update_cpu:.1f})",
            f"{len(lowered.as_text()) / 1e6:.1f}", f"{temp_mib:.0f}", f"{gflop:.0f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jmp_s", choices=sorted(config_lib.NAMED_CONFIGS))
    parser.add_argument("--batches", default="molecules")
    parser.add_argument("--scan", action="store_true", help="one scanned interaction block instead of unrolled ones")
    parser.add_argument("--remat", default="block", choices=REMAT_CHOICES, help="model.remat")
    parser.add_argument("--compilation-cache", action="store_true",
                        help="enable jmp_jax.compilation_cache as the CLIs do (its directory is in the notes)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="jax.default_matmul_precision: bfloat16 products, float32 activations")
    args = parser.parse_args()
    cache = compilation_cache.enable() if args.compilation_cache else None
    execution = BlockExecution(scan=args.scan, remat=args.remat)
    with jax.default_matmul_precision(args.precision):
        rows = [compile_times(name, config_lib.NAMED_CONFIGS[args.config](), execution)
                for name in args.batches.split(",")]
    header = ["batch", "gradient: trace + lower, or read back + lower s (CPU s)", "gradient: XLA compile s (CPU s)",
              "gradient: total s (CPU s)", "update (once per run): total s (CPU s)", "gradient StableHLO MB",
              "gradient temporaries MiB (XLA)", "gradient GFLOP (XLA)"]
    blocks = f"{'scanned' if args.scan else 'unrolled'} blocks, remat {args.remat}, {args.precision} products"
    common.report(f"bench_compile: {args.config} training step ({blocks})", common.table(header, rows),
                  notes=f"Persistent compilation cache: {cache or 'off'}; traced-program store: "
                        f"{program_store.directory() or 'off'}.")


if __name__ == "__main__":
    main()
