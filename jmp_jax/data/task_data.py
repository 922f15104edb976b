"""From a run config to tasks: shard sources, normalisation, graph settings, budget shapes and pipelines."""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import ml_collections
import numpy as np

from jmp_jax.data import budget_plan
from jmp_jax.data.pipeline import Pipeline, TaskSpec, temperature_probabilities
from jmp_jax.data.process_exchange import ProcessExchange
from jmp_jax.data.tfrecord_index import TFRecordSource
from jmp_jax.data.types import TaskNormalization
from jmp_jax.graph.build import GraphSettings


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


def open_source(data_dir: str, source: str, split: str) -> TFRecordSource:
    """A prepared split as random-access records through its record indexes, checked against its metadata
    (each record's checksum is checked when it is read)."""
    from jmp_jax.data import records
    paths, meta = records.split_shards(data_dir, source, split)
    if not meta["num_records"]:
        raise ValueError(f"split {source}-{split} in {data_dir} holds no records")
    opened = TFRecordSource(paths, records.decode_example)
    records.check_record_count(meta, len(opened), data_dir)
    return opened


def check_energy_kind(config: ml_collections.ConfigDict, data_dir: str, task) -> None:
    """A task's train and val splits hold one energy kind (total or referenced), the task's `energy_kind`
    where it names one; otherwise a one-line ValueError naming the splits."""
    from jmp_jax.data import metadata, records
    splits = dict.fromkeys(s for s in (config.data.train_split, config.data.get("val_split")) if s)
    metas = {f"{task['source']}-{split}": records.load_metadata(data_dir, task["source"], split) for split in splits
             if os.path.exists(records.metadata_path(data_dir, task["source"], split))}
    metadata.check_energy_kinds(task["name"], metas, task.get("energy_kind"))


def load_tasks(config: ml_collections.ConfigDict) -> list[Task]:
    """The configured tasks, with budget shapes planned per task (task_mixing "step") or on the
    temperature-mixed union of the tasks, shared by all (task_mixing "batch")."""
    from jmp_jax.data import records
    data_dir = config.data.dir
    if not data_dir:
        raise ValueError("config.data.dir is empty: name a folder of prepared splits (experiments.pretrain "
                         "fills it with the embedded default dataset)")
    mixed = config.data.task_mixing == "batch"
    planned = []
    for t in config.data.tasks:
        check_energy_kind(config, data_dir, t)
        meta = records.load_metadata(data_dir, t["source"], config.data.train_split)
        settings = GraphSettings(cutoff=t["cutoff"], max_neighbors=t["max_neighbors"], pbc=(bool(t["pbc"]),) * 3)
        linref = np.asarray(meta["linear_reference"], np.float64) if t["linear_reference"] else None
        stats = meta["referenced" if t["linear_reference"] else "raw"]
        norm = TaskNormalization(
            energy_std=float(t["energy_std"] or stats["energy_std"]),
            force_std=float(t["force_std"] or stats["forces_std"]),
            energy_coefficient=float(t["energy_coefficient"]), force_coefficient=float(t["force_coefficient"]))
        source = open_source(data_dir, t["source"], config.data.train_split)
        # Validation packs into the same shapes: its largest structures must fit a batch too.
        val_split = config.data.get("val_split")
        val = [open_source(data_dir, t["source"], val_split)] if val_split and os.path.exists(
            records.metadata_path(data_dir, t["source"], val_split)) else []
        sample = budget_plan.sample_needs(source, settings, config.seed, config.data.edge_dropout, also_fit=val)
        planned.append((t, settings, linref, norm, len(source), sample))
    samples = [p[-1] for p in planned]
    if mixed:
        probabilities = temperature_probabilities([p[4] for p in planned], config.data.temperature)
        samples = [budget_plan.mixture_sample(samples, probabilities, config.seed)]
    shapes = [budget_plan.plan_buckets(None, None, config.data.structures_per_batch, config.seed,
                           shards_per_step=config.data.num_batch_shards, sample=sample) for sample in samples]
    if mixed:
        samples, shapes = samples * len(planned), shapes * len(planned)
    tasks = []
    for (t, settings, linref, norm, _, _), sample, buckets in zip(planned, samples, shapes):
        tasks.append(Task(name=t["name"], data_dir=data_dir, source=t["source"],
                          spec=TaskSpec(t["name"], settings, buckets, linref, sample.slot_widths),
                          normalization=norm))
    return tasks


def make_pipeline(config: ml_collections.ConfigDict, tasks: Sequence[Task], *, split: str, training: bool,
                  only_task: int | None = None, lanes: Sequence[int] | None = None,
                  exchange: ProcessExchange | None = None) -> Pipeline:
    """Training: shuffled, temperature-mixed, with edge dropout. Otherwise: in order, no dropout.

    only_task: that task's structures alone, in the run's batch shapes (with "batch" task mixing, every
    task stays in the pipeline with probability 0 but this one's, so structures keep their task index).
    lanes, exchange: this process's batch shards and the exchange with the others (`Pipeline`).
    """
    mixed = config.data.task_mixing == "batch"
    chosen = list(range(len(tasks))) if only_task is None or mixed else [only_task]
    sources = [open_source(tasks[i].data_dir, tasks[i].source, split) for i in chosen]
    probabilities = None if training else [len(s) for s in sources]
    if only_task is not None:
        probabilities = np.eye(len(chosen))[chosen.index(only_task)]
    if probabilities is not None:
        probabilities = np.asarray(probabilities, np.float64) / np.sum(probabilities)
    return Pipeline([tasks[i].spec for i in chosen], sources, seed=config.seed,
                    temperature=config.data.temperature, num_batch_shards=config.data.num_batch_shards,
                    edge_dropout=config.data.edge_dropout if training else 0.0, shuffle=training,
                    num_workers=config.data.num_workers, prefetch=config.data.prefetch,
                    task_probabilities=probabilities, task_mixing=config.data.task_mixing, lanes=lanes,
                    exchange=exchange, name=f"{split}/{'training' if training else 'in-order'}/{only_task}")
