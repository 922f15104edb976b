r"""Host-side input pipeline: graph-building throughput and padding fill on the default dataset.

  python bench/bench_pipeline.py
  python bench/bench_pipeline.py --batches 50 --structures-per-batch 4

Part 1 times one worker building graphs (JMP pre-training settings) and collating batches for
OC20-sized periodic slabs and for QM9 molecules. Part 2 runs the real training pipeline (edge dropout
0.1) on every task of the embedded default dataset and reports the real / padded fill of every budget
and the number of distinct batch shapes (compiled steps) seen, for one static shape planned without or
with the training edge dropout (`plan_budgets`) and for the task's buckets (`plan_buckets`, at most two
shapes, each step packed into the one it fills best).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_model import cu_slab  # noqa: E402
from configs import pretrain_common  # noqa: E402
from data_prep import default_dataset  # noqa: E402
from jmp_jax.data import budget_plan, task_data  # noqa: E402
from jmp_jax.graph import batching, slots  # noqa: E402
from jmp_jax.graph.build import GraphSettings, build_from_atoms, build_structure_graphs  # noqa: E402

FILL_KINDS = ("nodes", "edges", "a2ee2a", "qint", "a2a") + tuple(f"{name}_slots" for name in slots.SLOTTED_GRAPHS)


def throughput(name: str, structures: list, build, per_batch: int) -> list:
    """Structures/s of one thread: graph building alone, and building + collating batches of `per_batch`."""
    t0 = time.perf_counter()
    graphs = [build(s) for s in structures]
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(graphs) - per_batch + 1, per_batch):
        chunk = graphs[i:i + per_batch]
        batching.collate(chunk, batching.budgets_for(chunk))
    collate_s = time.perf_counter() - t0
    n = len(structures)
    atoms = np.mean([g.num_atoms for g in graphs])
    a2a = np.mean([g.a2a.num_edges for g in graphs])
    return [name, n, f"{atoms:.0f}", f"{a2a:.0f}", f"{n / build_s:.1f}", f"{n / (build_s + collate_s):.1f}"]


def molecule_records(data_dir: str, count: int) -> list:
    source = task_data.open_source(data_dir, "molecules", "train")
    return [source[i] for i in range(min(count, len(source)))]


def shape_plans(config: ml_collections.ConfigDict, task: task_data.Task) -> dict:
    """Budget shapes to compare: one shape planned without / with the training edge dropout, and the buckets."""
    source = task_data.open_source(task.data_dir, task.source, config.data.train_split)
    single = functools.partial(budget_plan.plan_budgets, source, task.spec.settings, config.data.structures_per_batch,
                               config.seed)
    return {"1 shape, planned without dropout": (single(),),
            "1 shape, planned with dropout": (single(edge_dropout=config.data.edge_dropout),),
            "buckets (plan_buckets)": task.spec.buckets}


def fill_table(config: ml_collections.ConfigDict, batches: int) -> list:
    tasks = task_data.load_tasks(config)
    rows = []
    for t, task in enumerate(tasks):
        for plan, buckets in shape_plans(config, task).items():
            planned = [dataclasses.replace(x, spec=dataclasses.replace(x.spec, buckets=buckets)) if i == t else x
                       for i, x in enumerate(tasks)]
            pipe = task_data.make_pipeline(config, planned, split="train", training=True, only_task=t)
            stacked = [next(pipe)[1] for _ in range(batches)]
            pipe.close()
            fills = [budget_plan.fill_ratios(b, task.name) for b in stacked]
            shapes = {tuple(x.shape for x in jax.tree.leaves(b)) for b in stacked}
            mean = {k: np.mean([f[f"fill/{task.name}/{k}"] for f in fills]) for k in FILL_KINDS}
            structures = np.mean([b.graphs.graph.globals["mask"].sum(axis=-1).mean() for b in stacked])
            rows.append([task.name, plan, len(buckets), len(shapes), f"{structures:.1f}"]
                        + [f"{100 * mean[k]:.0f}%" for k in FILL_KINDS])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=30, help="batches per task for the fill ratios")
    parser.add_argument("--structures-per-batch", type=int, default=4)
    parser.add_argument("--count", type=int, default=48, help="structures timed per kind")
    args = parser.parse_args()

    config = pretrain_common.pretrain_config("jmp_s")
    config.data.structures_per_batch = args.structures_per_batch
    config.data.dir = data_dir = default_dataset.data_dir_for(config)
    slabs = [cu_slab("CO" if i % 2 else "OH", i) for i in range(args.count)]
    periodic = GraphSettings.pretrain_periodic()
    molecular = GraphSettings.pretrain_molecule()
    rows = [
        throughput("Cu(111) 4x4x4 + CO/OH, 12 Å PBC", slabs, lambda a: build_from_atoms(a, periodic),
                   args.structures_per_batch),
        throughput("QM9 molecules (default set), 8 Å", molecule_records(data_dir, args.count),
                   lambda r: build_structure_graphs(r["atomic_numbers"], r["positions"], r["cell"], None,
                                                    r["tags"], molecular), args.structures_per_batch),
    ]
    speed = common.table(["structures", "n", "mean atoms", "mean a2a edges", "graphs/s (1 thread)",
                          "graphs+batching/s (1 thread)"], rows)
    fill = common.table(["task", "budgets", "planned shapes", "compiled shapes seen", "real structures / batch"]
                        + [f"fill {k}" for k in FILL_KINDS],
                        fill_table(config, args.batches))
    common.report("bench_pipeline: host graph building and padding fill",
                  speed + "\n\nFill (real / padded entries) over the training pipeline of the default dataset, "
                  f"{args.batches} batches per task, edge dropout 0.1 (`<graph>_slots`: real edges / (atoms x "
                  "slots) of the per-atom slot grid):\n\n" + fill)


if __name__ == "__main__":
    main()
