"""Fine-tuning batches: one prepared split (data_prep TFRecord shards) -> padded LabeledBatches, one pass.

Batches hold at most `batch_size` structures (JMP's batch size) and close early when the next structure
would overflow the static budgets, so one compiled step serves (almost) every batch; a structure too big
for the budgets even alone gets a batch of its own with bucketed budgets (one more compile).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from typing import Iterator, Sequence

import numpy as np

from jmp_jax.data import budget_plan, task_data
from jmp_jax.data.pipeline import label_arrays, target_array
from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, StructureGraphs, build_structure_graphs
from jmp_jax.graph.batching import bucketed_budgets
from jmp_jax.data.types import LabeledBatch

# JMP's `conditional_max_neighbors` (MatBench, QMOF): fewer neighbours for large cells.
CONDITIONAL_MAX_NEIGHBORS = ((300, 5), (200, 10))
# Records whose graphs are built ahead per worker batch.
CHUNK = 64


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a task's structures are and how they become graphs and labels."""

    source: str                      # dataset name in the data dir, e.g. "rmd17_ethanol", "qm9"
    cutoff: float
    max_neighbors: int
    pbc: bool
    batch_size: int
    target: str | None = None        # scalar target name (record["targets"]); None: energy + forces
    conditional_max_neighbors: bool = False

    def settings(self, num_atoms: int) -> GraphSettings:
        max_neighbors = self.max_neighbors
        if self.conditional_max_neighbors:
            max_neighbors = next((k for above, k in CONDITIONAL_MAX_NEIGHBORS if num_atoms > above), max_neighbors)
        return GraphSettings(cutoff=self.cutoff, max_neighbors=max_neighbors, pbc=(self.pbc,) * 3)


def build_graphs(record: dict, spec: DataSpec, index: int) -> StructureGraphs:
    return build_structure_graphs(
        record["atomic_numbers"], record["positions"], record["cell"], None, record["tags"],
        spec.settings(len(record["atomic_numbers"])), fixed=record["fixed"],
        name=f"{spec.source} record {index} ({record.get('source_id', '?')})")


def make_batch(records: Sequence[dict], graphs: Sequence[StructureGraphs], budgets: batching.Budgets,
               spec: DataSpec) -> LabeledBatch:
    """Numpy LabeledBatch: targets for scalar tasks, energy + forces for force tasks."""
    graph_batch = batching.collate(graphs, budgets)
    if spec.target is None:
        energy, forces = label_arrays(records, budgets, None)
        return LabeledBatch(graphs=graph_batch, energy=energy, forces=forces)
    return LabeledBatch(graphs=graph_batch, energy=np.zeros(budgets.graphs, np.float32),
                        forces=np.zeros((budgets.nodes, 3), np.float32),
                        targets=target_array(records, budgets, spec.target))


class SplitData:
    """One split of a task: `len()` structures, `batches(order)` packs them into padded batches."""

    def __init__(self, data_dir: str, spec: DataSpec, split: str, budgets: batching.Budgets | None = None, *,
                 seed: int = 0, num_workers: int = 2):
        self.spec, self.split = spec, split
        self.source = task_data.open_source(data_dir, spec.source, split)
        self.budgets = budgets or budget_plan.plan_budgets(self.source, spec.settings(0), spec.batch_size, seed)
        self.num_workers = max(num_workers, 1)

    def __len__(self) -> int:
        return len(self.source)

    def order(self, epoch: int | None, seed: int) -> np.ndarray:
        """Record order of one pass: a seeded shuffle per epoch, or stored order when epoch is None."""
        n = len(self.source)
        return np.arange(n) if epoch is None else np.random.default_rng([seed, epoch]).permutation(n)

    def _built(self, order: np.ndarray, executor) -> Iterator[tuple[dict, StructureGraphs]]:
        def load(i):
            record = self.source[int(i)]
            return record, build_graphs(record, self.spec, int(i))

        for start in range(0, len(order), CHUNK):
            yield from executor.map(load, order[start:start + CHUNK])

    def batches(self, order: np.ndarray) -> Iterator[LabeledBatch]:
        """Numpy batches covering `order` once, in that order."""
        records, graphs, used = [], [], batching.Budgets.zeros()
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as executor:
            for record, g in self._built(order, executor):
                size = batching.structure_sizes(g)
                if records and (len(records) == self.spec.batch_size or not (used + size).fits_in(self.budgets)):
                    yield make_batch(records, graphs, self.budgets, self.spec)
                    records, graphs, used = [], [], batching.Budgets.zeros()
                if not size.fits_in(self.budgets):
                    yield make_batch([record], [g], bucketed_budgets([g]), self.spec)
                    continue
                records.append(record)
                graphs.append(g)
                used = used + size
        if records:
            yield make_batch(records, graphs, self.budgets, self.spec)
