"""From a run config to tasks: shard sources, normalisation, graph settings, budgets and pipelines."""
from __future__ import annotations

import dataclasses

from typing import Any, Sequence

import ml_collections
import numpy as np

from jmp_jax.data.pipeline import PACKING_WINDOW_PER_GRAPH, Pipeline, TaskSpec
from jmp_jax.data.tfrecord_index import TFRecordSource
from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, build_structure_graphs
from jmp_jax.training.loss import TaskNormalization

# Structures sampled per task to size its static budgets, passes over them when replaying the packing,
# and rounds of shrinking the budgets to what the replayed batches use.
BUDGET_SAMPLE = 64
# The most atoms-rich structures are always measured too (in sources small enough to scan), with some
# headroom for denser structures of fewer atoms, so that every structure fits a batch on its own.
LARGEST_SCANNED = 8
SCAN_LIMIT = 200_000
LARGEST_HEADROOM = 1.1
PACKING_REPLAYS = 8
BUDGET_REFINEMENTS = 3


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    data_dir: str
    source: str
    spec: TaskSpec
    normalization: TaskNormalization

    def describe(self) -> dict:
        """JSON-able identity of the task, stored in checkpoints."""
        n = self.normalization
        return {"name": self.name, "cutoff": self.spec.settings.cutoff,
                "max_neighbors": self.spec.settings.max_neighbors, "energy_std": n.energy_std,
                "force_std": n.force_std, "linear_reference": (None if self.spec.linear_reference is None
                                                               else self.spec.linear_reference.tolist())}


def data_dir_of(config: ml_collections.ConfigDict) -> str:
    if config.data.dir:
        return config.data.dir
    from data_prep import default_dataset  # builds the embedded dataset once, then reuses the cache
    sizes = {"full": default_dataset.DEFAULT_SIZES, "small": default_dataset.SMALL_SIZES}
    if config.data.default_dataset_size not in sizes:
        raise ValueError(f"data.default_dataset_size {config.data.default_dataset_size!r} is not one of {sorted(sizes)}")
    return default_dataset.ensure_default_dataset(sizes=sizes[config.data.default_dataset_size])


def open_source(data_dir: str, source: str, split: str) -> TFRecordSource:
    from data_prep import records
    return TFRecordSource(records.shard_paths(data_dir, source, split), records.decode_example)


def largest_structures(source) -> np.ndarray:
    """Indices of the structures with the most atoms (none for sources too large to scan)."""
    if len(source) > SCAN_LIMIT:
        return np.zeros(0, np.int64)
    natoms = np.array([len(source[i]["atomic_numbers"]) for i in range(len(source))])
    return np.argsort(-natoms, kind="stable")[:LARGEST_SCANNED]


def plan_budgets(source, settings: GraphSettings, structures_per_batch: int, seed: int) -> batching.Budgets:
    """Static budgets for one task, sized on a sample of its structures.

    Start proportional to the mean need of every kind, for at least `structures_per_batch` structures
    (and the largest sampled one alone); then replay the pipeline's packing on the sample and shrink
    each budget to what its batches use (90th percentile), so no kind is mostly padding.
    Graph slots are cheap and stay generous so they rarely bind.
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(BUDGET_SAMPLE, len(source)), replace=False)
    needs = []
    for i in np.concatenate([picks, largest_structures(source)]):
        r = source[int(i)]
        g = build_structure_graphs(r["atomic_numbers"], r["positions"], r["cell"], None, r["tags"],
                                   settings, fixed=r["fixed"], name=f"record {i}")
        needs.append(batching.structure_sizes(g))
    sizes = np.asarray([n.as_array() for n in needs], np.float64)
    sizes, outliers = sizes[:len(picks)], sizes[len(picks):]
    mean = np.maximum(sizes.mean(0), 1.0)
    largest = np.ceil(np.vstack([sizes, outliers]).max(0) * LARGEST_HEADROOM)
    multiple = max(float(structures_per_batch), float(np.max(largest / mean)))
    graphs_slot = list(batching.Budgets.zeros().as_dict()).index("graphs")
    target = np.ceil(mean * multiple)
    target[graphs_slot] = 2 * np.ceil(multiple)
    replay = [needs[i] for i in np.concatenate([rng.permutation(len(picks)) for _ in range(PACKING_REPLAYS)])]
    for _ in range(BUDGET_REFINEMENTS):
        budgets = batching.Budgets.from_array(target + 1)  # one padding slot per array
        used = batching.simulate_packing(replay, budgets, PACKING_WINDOW_PER_GRAPH * budgets.graphs)
        shrunk = np.maximum(np.ceil(np.percentile(used, 90, axis=0)), largest)
        shrunk[graphs_slot] = target[graphs_slot]
        target = shrunk
    return batching.Budgets.from_array(target + 1)


def load_tasks(config: ml_collections.ConfigDict) -> list[Task]:
    from data_prep import records
    data_dir = data_dir_of(config)
    tasks = []
    for t in config.data.tasks:
        meta = records.load_metadata(data_dir, t["source"], config.data.train_split)
        settings = GraphSettings(cutoff=t["cutoff"], max_neighbors=t["max_neighbors"], pbc=(bool(t["pbc"]),) * 3)
        linref = np.asarray(meta["linear_reference"], np.float64) if t["linear_reference"] else None
        stats = meta["referenced" if t["linear_reference"] else "raw"]
        norm = TaskNormalization(
            energy_std=float(t["energy_std"] or stats["energy_std"]),
            force_std=float(t["force_std"] or stats["forces_std"]),
            energy_coefficient=float(t["energy_coefficient"]), force_coefficient=float(t["force_coefficient"]))
        source = open_source(data_dir, t["source"], config.data.train_split)
        budgets = plan_budgets(source, settings, config.data.structures_per_batch, config.seed)
        tasks.append(Task(name=t["name"], data_dir=data_dir, source=t["source"],
                          spec=TaskSpec(t["name"], settings, budgets, linref), normalization=norm))
    return tasks


def make_pipeline(config: ml_collections.ConfigDict, tasks: Sequence[Task], *, split: str, training: bool,
                  only_task: int | None = None) -> Pipeline:
    """Training: shuffled, temperature-mixed, with edge dropout. Otherwise: in order, no dropout."""
    chosen = list(range(len(tasks))) if only_task is None else [only_task]
    sources = [open_source(tasks[i].data_dir, tasks[i].source, split) for i in chosen]
    probabilities = None if training else [len(s) for s in sources] if only_task is None else [1.0]
    if probabilities is not None:
        probabilities = np.asarray(probabilities, np.float64) / np.sum(probabilities)
    return Pipeline([tasks[i].spec for i in chosen], sources, seed=config.seed,
                    temperature=config.data.temperature, num_batch_shards=config.data.num_batch_shards,
                    edge_dropout=config.data.edge_dropout if training else 0.0, shuffle=training,
                    num_workers=config.data.num_workers, prefetch=config.data.prefetch,
                    task_probabilities=probabilities)


def fill_ratios(batch: Any, task: Task) -> dict[str, float]:
    """Real entries / budget for every padded array of a (stacked) batch."""
    g = batch.graphs
    masks = {"nodes": g.graph.nodes["mask"], "edges": g.graph.edges["mask"], "a2ee2a": g.a2ee2a.mask,
             "qint": g.qint.mask, "a2a": g.a2a.mask, "trip_e2e": g.trip_e2e.mask, "trip_a2e": g.trip_a2e.mask,
             "trip_e2a": g.trip_e2a.mask, "quads": g.quad.mask, "graphs": g.graph.globals["mask"]}
    return {f"fill/{task.name}/{k}": float(np.mean(np.asarray(m))) for k, m in masks.items()}


