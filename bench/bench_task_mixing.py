r"""Mixed-task batches (JMP's, `data.task_mixing="batch"`) against one task per step ("step"), at equal steps.

  python bench/bench_task_mixing.py                      # demo config: demo backbone, small default dataset
  python bench/bench_task_mixing.py --steps 60 --eval-batches 8

Trains the same config from the same seed in both modes with the pre-training run's own pieces (task
budgets, input pipeline, optimiser, jitted step, validation) and reports per mode: compiled step shapes,
structures per batch, padding fill of the batches, median step time after compiling, and each task's
validation loss and MAEs (EMA parameters, the validation split) after the same number of steps.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from configs import pretrain_common  # noqa: E402
from data_prep import default_dataset  # noqa: E402
from jmp_jax.data import budget_plan, task_data  # noqa: E402
from jmp_jax.models.jmp import JMPModel  # noqa: E402
from jmp_jax.training import loop, optim, sharding  # noqa: E402
from jmp_jax.training.state import init_train_state, init_variables  # noqa: E402
from jmp_jax.training.train_step import eval_step, train_step  # noqa: E402

PADDED_KINDS = ("nodes", "edges", "a2ee2a", "qint", "a2a")


def shapes_of(batch) -> tuple:
    return tuple(x.shape for x in jax.tree.leaves(batch))


def train_and_validate(config, steps: int) -> dict:
    """Trains `steps` steps in `config.data.task_mixing` mode; batch statistics, step times, validation."""
    tasks = task_data.load_tasks(config)
    norms = tuple(t.normalization for t in tasks)
    norm_of = lambda task: norms if task is None else norms[task]  # noqa: E731
    backbone = loop.backbone_config(config.model.backbone)
    model = JMPModel(backbone, num_tasks=len(tasks))
    mesh = sharding.make_mesh(config.mesh.fsdp)
    pipe = task_data.make_pipeline(config, tasks, split="train", training=True)
    batches = [next(pipe) for _ in range(steps)]
    pipe.close()
    variables = init_variables(model, config.seed, config.model.scale_factors, config.model.backbone)
    tx, schedule = optim.pretrain_optimizer(
        variables["params"], num_blocks=backbone.num_blocks, peak_lr=config.train.lr,
        warmup_steps=config.train.warmup_steps, total_steps=config.train.num_steps, b1=config.train.b1,
        b2=config.train.b2, weight_decay=config.train.weight_decay, clip_norm=config.train.clip_norm,
        warmup_start_factor=config.train.warmup_start_factor, min_lr_factor=config.train.min_lr_factor)
    state = init_train_state(variables, tx)
    step_fns, compiled, times, compile_s = {}, set(), [], 0.0
    for task, batch in batches:
        if task not in step_fns:
            step_fns[task] = jax.jit(functools.partial(
                train_step, model=model, tx=tx, schedule=schedule, task=task, norm=norm_of(task),
                ema_decay=config.train.ema_decay, mesh=mesh), donate_argnums=0)
        new_shape = (task, shapes_of(batch)) not in compiled
        compiled.add((task, shapes_of(batch)))
        t0 = time.perf_counter()
        state, metrics = step_fns[task](state, batch)
        jax.block_until_ready(metrics)
        elapsed = time.perf_counter() - t0
        if new_shape:
            compile_s += elapsed
        else:
            times.append(elapsed)
    evals = {}

    def eval_fn(task):
        if task not in evals:
            evals[task] = jax.jit(functools.partial(eval_step, model=model, task=task, norm=norm_of(task), mesh=mesh))
        return evals[task]

    fills = np.array([[budget_plan.fill_ratios(b, "x")[f"fill/x/{k}"] for k in PADDED_KINDS] for _, b in batches])
    return {"tasks": tasks, "compiled": len(compiled), "compile_s": compile_s,
            "median_ms": 1e3 * float(np.median(times)), "mean_ms": 1e3 * float(np.mean(times)),
            "structures": float(np.mean([b.graphs.graph.globals["mask"].sum() for _, b in batches])),
            "atoms": float(np.mean([b.graphs.graph.nodes["mask"].sum() for _, b in batches])),
            "fill": fills.mean(axis=0), "validation": loop.validate(config, tasks, state, eval_fn, mesh)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="demo", help="pretrain config variant (demo | test)")
    parser.add_argument("--steps", type=int, default=40, help="training steps in each mode")
    parser.add_argument("--eval-batches", type=int, default=4, help="validation batches per task")
    args = parser.parse_args()

    results = {}
    for mode in ("batch", "step"):
        config = pretrain_common.get_config_for("jmp_s", args.variant)
        config.data.task_mixing = mode
        config.data.dir = default_dataset.data_dir_for(config)
        config.train.num_steps = args.steps
        config.log.eval_batches = args.eval_batches
        common.stage(f"task_mixing={mode}: {args.steps} steps")
        results[mode] = train_and_validate(config, args.steps)

    header = ["task_mixing", "compiled step shapes", "structures / batch", "atoms / batch",
              *(f"fill {k}" for k in PADDED_KINDS), "compile s", "median step ms", "mean step ms",
              "structures / s", "atoms / s"]
    rows = [[mode, r["compiled"], f"{r['structures']:.1f}", f"{r['atoms']:.0f}",
             *(f"{100 * f:.0f}%" for f in r["fill"]), f"{r['compile_s']:.0f}", f"{r['median_ms']:.0f}",
             f"{r['mean_ms']:.0f}", f"{r['structures'] / r['mean_ms'] * 1e3:.2f}",
             f"{r['atoms'] / r['mean_ms'] * 1e3:.0f}"] for mode, r in results.items()]
    val_header = ["task", *(f"{mode}: val {kind}" for mode in results for kind in ("loss", "E MAE eV", "F MAE eV/Å"))]
    val_rows = [[task.name, *(f"{results[mode]['validation'][f'val/{key}/{task.name}']:.4g}"
                              for mode in results for key in ("loss", "energy_mae", "forces_mae"))]
                for task in results["batch"]["tasks"]]
    config = pretrain_common.get_config_for("jmp_s", args.variant)
    notes = (f"Config `configs/jmp_s.py:{args.variant}` ({config.model.backbone} backbone, "
             f"{config.data.default_dataset_size} default dataset, {config.data.structures_per_batch} structures "
             f"per batch planned, {config.data.num_batch_shards} batch shard(s) per step), {args.steps} training "
             f"steps per mode from the same seed, then validation of the EMA parameters on {args.eval_batches} "
             f"batches per task. Step times exclude the steps that compiled a new shape; structures/s and "
             f"atoms/s use the mean step time. The machine was shared with other jobs (2 cores, load average "
             f"above), so times are indicative only. "
             f"Peak RSS: {common.peak_rss_mib():.0f} MiB.")
    common.report("bench_task_mixing: mixed-task batches against one task per step, at equal steps",
                  common.table(header, rows) + "\n\n" + common.table(val_header, val_rows), notes=notes)


if __name__ == "__main__":
    main()
