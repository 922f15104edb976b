r"""Fine-tuning throughput: steps/s and atoms/s of the real fine-tuning step, with gradient forces (rMD17)
and with a scalar head (QM9), compile time apart from the steady-state step.

  python bench/bench_finetune.py                        # JMP-S, float32 (random weights)
  python bench/bench_finetune.py --precision float32,bfloat16   # and with bf16 matrix-product operands
  python bench/bench_finetune.py --config demo --steps 1 --no-report   # the smoke test

Tasks use their JMP fine-tuning configs (configs/finetune: graph settings, batch size, optimiser, loss)
on stand-in structures with random labels: rMD17 ethanol (ase's, 9 atoms) and an aspirin-size molecule
(n-hexane, 20 atoms; aspirin has 21), one frame per batch, 7 Å and 100 neighbours, F = -dE/dpos; QM9
U_0 on QM9-size molecules (propane to heptane, 11-23 atoms, mean 17; QM9's mean is 18), 48 per batch,
8 Å. Batch budgets are planned as a fine-tuning run plans them (`budget_plan.plan_budgets` on the task's
structures). The step is `jmp_jax.finetune.loop.train_step` (AdamW with JMP's LR groups, gradient
clipping, donated state), timed on one batch after a warm-up step; "host batch ms" is the graph
building and collation of that batch, which a run does on worker threads alongside the step.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import molecule  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_model import alkane, timed_compile, timed_update_compile  # noqa: E402
from configs.finetune import common as finetune_configs  # noqa: E402
from jmp_jax.data import budget_plan  # noqa: E402
from jmp_jax.data.pipeline import stack_shards  # noqa: E402
from jmp_jax.finetune import data, loop, optim  # noqa: E402
from jmp_jax.finetune import loss as loss_lib  # noqa: E402
from jmp_jax.finetune.model import FinetuneModel, backbone_for  # noqa: E402
from jmp_jax.graph import batching  # noqa: E402
from jmp_jax.training.state import SplitStep, apply_gradient, init_train_state, init_variables  # noqa: E402

# Structures a task's budgets are planned on (a fine-tuning run samples up to 96 of its split).
PLANNING_STRUCTURES = 96


def ethanol(seed: int) -> Atoms:
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.02, seed=seed)
    return atoms


# name: (dataset, config task, structure of seed s, what it stands for)
TASKS = {
    "rmd17_ethanol": ("rmd17", "ethanol", ethanol, "rMD17 ethanol"),
    "rmd17_aspirin_size": ("rmd17", "aspirin", lambda s: alkane(6, s), "rMD17 aspirin-size (hexane)"),
    "qm9_U_0": ("qm9", "U_0", lambda s: alkane(3 + s % 5, s), "QM9 U_0 (C3-C7 alkanes)"),
}


def record(atoms: Atoms, index: int, rng: np.random.Generator) -> dict:
    """The fields of a prepared molecule record that fine-tuning reads, with random labels."""
    n = len(atoms)
    return {"atomic_numbers": atoms.numbers.astype(np.int64), "positions": atoms.positions, "cell": np.zeros((3, 3)),
            "tags": np.full(n, 2, np.int64), "fixed": np.zeros(n, bool), "source_id": f"bench {index}",
            "energy": float(rng.normal()), "forces": rng.normal(size=(n, 3)), "targets": {"U_0": float(rng.normal())}}


def first_batch(records: list[dict], spec: data.DataSpec, budgets: batching.Budgets):
    """The first batch a fine-tuning pass packs from `records` in order (at most batch_size, within budgets)."""
    chosen, graphs, used = [], [], batching.Budgets.zeros()
    for i, r in enumerate(records):
        g = data.build_graphs(r, spec, i)
        size = batching.structure_sizes(g)
        if len(chosen) == spec.batch_size or not (used + size).fits_in(budgets):
            break
        chosen, graphs, used = chosen + [r], graphs + [g], used + size
    return data.make_batch(chosen, graphs, budgets, spec)


def normalization(task) -> loss_lib.Normalization:
    """The task's configured statistics (both JMP tables fix them, so no split metadata is needed)."""
    if task.kind == "forces":
        return loss_lib.Normalization(force_std=task.force_std, coefficient=task.loss_coefficient)
    return loss_lib.Normalization(target_mean=task.target_mean, target_std=task.target_std,
                                  coefficient=task.loss_coefficient)


def bench_task(name: str, size: str, precision: str, steps: int, max_batch_size: int | None) -> list:
    dataset, key, structure, label = TASKS[name]
    config = finetune_configs.get_config(dataset, f"{key},{size}")
    jmp_batch_size = config.data.batch_size
    config.data.batch_size = min(jmp_batch_size, max_batch_size or jmp_batch_size)
    spec, dspec = loop.head_spec(config.task), loop.data_spec(config)
    rng = np.random.default_rng(0)
    records = [record(structure(s), s, rng) for s in range(PLANNING_STRUCTURES)]
    common.stage(f"{name}: planning budgets and building a batch")
    budgets = budget_plan.plan_budgets(records, dspec.settings(0), dspec.batch_size, config.seed)
    t0 = time.perf_counter()
    batch = first_batch(records, dspec, budgets)
    host_ms = (time.perf_counter() - t0) * 1e3
    structures = int(batch.graphs.graph.globals["mask"].sum())
    atoms = int(batch.graphs.graph.nodes["mask"].sum())

    backbone = backbone_for(loop.backbone_config(config.model.backbone), spec)
    model = FinetuneModel(backbone, spec, dtype=jnp.dtype(config.model.dtype))
    variables = init_variables(model, config.seed, config.model.scale_factors, config.model.backbone)
    tx, _ = optim.finetune_optimizer(variables["params"], loop.optim_config(config, backbone.num_blocks, 1000),
                                     backbone.num_blocks)
    state = init_train_state(variables, tx, ema=False)
    # As the fine-tuning loop runs it (`state.SplitStep`): the gradient, compiled per batch shape, and the
    # optimiser update (state donated), compiled once.
    gradient = jax.jit(functools.partial(loop.train_loss_and_gradient, model=model, norm=normalization(config.task)))
    update = jax.jit(functools.partial(apply_gradient, tx=tx), donate_argnums=0)
    # One batch shard per step, as a single-device run steps.
    inputs = (stack_shards([batch]), jnp.ones((1,), jnp.float32), jax.random.key(1))
    lr_scale = jnp.float32(1.0)
    common.stage(f"{name}: compiling the step ({structures} structures, {atoms} atoms)")
    gradient_compiled, gradient_s, gradient_cpu_s = timed_compile(gradient, state.params, state.constants, *inputs)
    update_compiled, update_s, update_cpu_s = timed_update_compile(update, gradient, state, *inputs,
                                                                   update_inputs=(lr_scale,))
    step = SplitStep(gradient_compiled, update_compiled)
    state, metrics = step(state, *inputs, update_inputs=(lr_scale,))
    jax.block_until_ready(metrics)

    def one_step():
        nonlocal state
        state, m = step(state, *inputs, update_inputs=(lr_scale,))
        jax.block_until_ready(m)

    common.stage(f"{name}: timing {steps} steps")
    ms = common.median_ms(one_step, steps)
    batch_size = f"{dspec.batch_size}" + (f" (JMP: {jmp_batch_size})" if dspec.batch_size < jmp_batch_size else "")
    compile_s = f"{gradient_s:.1f} + {update_s:.1f} ({gradient_cpu_s:.1f} + {update_cpu_s:.1f})"
    return [label, "gradient forces" if spec.kind == "forces" else "scalar", precision, batch_size, structures, atoms,
            budgets.nodes, f"{host_ms:.0f}", compile_s,
            f"{ms:.0f}", f"{1e3 / ms:.2f}", f"{structures / ms * 1e3:.1f}", f"{atoms / ms * 1e3:.0f}"]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jmp_s", choices=finetune_configs.SIZES)
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per task after one warm-up step")
    parser.add_argument("--max-batch-size", type=int, default=None,
                        help="cap on the tasks' batch sizes (JMP's QM9 batch of 48 needs an estimated ~20 GB at JMP-S)")
    parser.add_argument("--precision", default="float32",
                        help="config.model.matmul_precision, or both comma-separated (each task in turn, one "
                             "process): bfloat16 rounds the operands of the matrix products to bfloat16")
    parser.add_argument("--no-report", action="store_true", help="print the table only (BENCHMARKS.md untouched)")
    args = parser.parse_args(argv)
    rows = []
    for name in args.tasks.split(","):
        for precision in args.precision.split(","):
            with jax.default_matmul_precision(precision):
                rows.append(bench_task(name, args.config, precision, args.steps, args.max_batch_size))
    header = ["task (stand-in structures)", "loss", "products", "batch size", "structures/batch", "atoms/batch",
              "atom budget", "host batch ms", "compile s: gradient + update (CPU s)", "median step ms", "steps/s",
              "structures/s", "atoms/s"]
    common.report(f"bench_finetune: {args.config} fine-tuning step",
                  common.table(header, rows), append=not args.no_report,
                  notes=f"Median of {args.steps} steps after one warm-up step, random weights and labels; peak RSS "
                        f"of the process {common.peak_rss_mib():.0f} MiB.")


if __name__ == "__main__":
    main()
