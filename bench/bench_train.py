r"""Speed of the real JMP-S pre-training step on batches of the embedded default dataset.

  python bench/bench_train.py                   # JMP-S, 4 structures per batch
  python bench/bench_train.py --config demo --steps 10

Uses the pre-training run's own pieces (task budgets, input pipeline, optimiser, jitted step) and
reports, per task, the compile time, median step time after warm-up, structures/s and atoms/s, with
the process's peak memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_model import step_programs, timed_compile, timed_update_compile  # noqa: E402
from configs import pretrain_common  # noqa: E402
from data_prep import default_dataset  # noqa: E402
from jmp_jax.data import task_data  # noqa: E402
from jmp_jax.models.jmp import JMPModel  # noqa: E402
from jmp_jax.training import loop, optim  # noqa: E402
from jmp_jax.training.state import SplitStep, init_train_state, init_variables  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jmp_s")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per task after one warm-up step")
    parser.add_argument("--structures-per-batch", type=int, default=4)
    args = parser.parse_args()

    config = pretrain_common.pretrain_config(args.config)
    config.data.structures_per_batch = args.structures_per_batch
    config.data.dir = default_dataset.data_dir_for(config)
    config.model.scale_factors = "fitted" if args.config in ("jmp_s", "jmp_l") else "none"
    tasks = task_data.load_tasks(config)
    backbone = loop.backbone_config(args.config)
    model = JMPModel(backbone, num_tasks=len(tasks))
    rows = []
    for t, task in enumerate(tasks):
        pipe = task_data.make_pipeline(config, tasks, split="train", training=True, only_task=t)
        batches = [next(pipe)[1] for _ in range(args.steps + 1)]
        pipe.close()
        if t == 0:
            variables = init_variables(model, 0, config.model.scale_factors, args.config)
            tx, schedule = optim.pretrain_optimizer(variables["params"], num_blocks=backbone.num_blocks,
                                                    peak_lr=3e-4, warmup_steps=2000, total_steps=100_000)
            state = init_train_state(variables, tx)
        # As the training loop runs it: the gradient compiled per batch shape (a task has up to two), the
        # optimiser update once.
        gradient, update = step_programs(model, tx, schedule, task=t, norm=task.normalization)
        gradients, compile_s = {}, 0.0
        for b in batches:
            shape = tuple(x.shape for x in jax.tree.leaves(b))
            if shape not in gradients:
                gradients[shape], seconds, _ = timed_compile(gradient, state.params, state.constants, b)
                compile_s += seconds
        if t == 0:  # the same program for every task
            update_compiled, update_compile_s, _ = timed_update_compile(update, gradient, state, batches[0])

        def run(state, b):
            return SplitStep(gradients[tuple(x.shape for x in jax.tree.leaves(b))], update_compiled)(state, b)

        state, metrics = run(state, batches[0])
        jax.block_until_ready(metrics)
        times = []
        for b in batches[1:]:
            t0 = time.perf_counter()
            state, metrics = run(state, b)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
        structures = np.mean([b.graphs.graph.globals["mask"].sum() for b in batches[1:]])
        atoms = np.mean([b.graphs.graph.nodes["mask"].sum() for b in batches[1:]])
        ms = 1e3 * float(np.median(times))
        rows.append([task.name, len(gradients), f"{structures:.1f}", f"{atoms:.0f}", f"{compile_s:.0f}", f"{ms:.0f}",
                     f"{1e3 / ms:.2f}", f"{structures / ms * 1e3:.1f}", f"{atoms / ms * 1e3:.0f}"])
    header = ["task", "batch shapes", "structures/batch", "atoms/batch", "gradient compile s", "median step ms",
              "steps/s", "structures/s", "atoms/s"]
    common.report(f"bench_train: {args.config} pre-training step on the default dataset",
                  common.table(header, rows),
                  notes=f"Peak RSS of the process: {common.peak_rss_mib():.0f} MiB. The step runs as the training "
                        f"loop's two programs: the gradient compiled per batch shape, the optimiser update once "
                        f"({update_compile_s:.0f} s). "
                        f"{args.steps} timed steps per task after one warm-up step; float32.")


if __name__ == "__main__":
    main()
