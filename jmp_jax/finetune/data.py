"""Fine-tuning batches: one prepared split (data_prep TFRecord shards) -> padded LabeledBatches, one pass;
for a training or evaluation step, `num_shards` of them stacked on a leading axis (one or more per device).

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
from jmp_jax.data.pipeline import label_arrays, stack_shards, target_array
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

    def packs(self, order: np.ndarray) -> Iterator[tuple[list[dict], list[StructureGraphs], batching.Budgets, int]]:
        """Greedy packing of `order` once, in that order: (records, graphs, budgets, records of `order`
        consumed with this pack). A pack depends only on the records from its first on, so packing
        `order[k:]` from a pack's end `k` gives the same packs that followed it (how a run resumes)."""
        records, graphs, used = [], [], batching.Budgets.zeros()
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as executor:
            for position, (record, g) in enumerate(self._built(order, executor)):
                size = batching.structure_sizes(g)
                if records and (len(records) == self.spec.batch_size or not (used + size).fits_in(self.budgets)):
                    yield records, graphs, self.budgets, position
                    records, graphs, used = [], [], batching.Budgets.zeros()
                if not size.fits_in(self.budgets):
                    yield [record], [g], bucketed_budgets([g]), position + 1
                    continue
                records.append(record)
                graphs.append(g)
                used = used + size
        if records:
            yield records, graphs, self.budgets, len(order)

    def batches(self, order: np.ndarray) -> Iterator[LabeledBatch]:
        """Numpy batches covering `order` once, in that order."""
        for records, graphs, budgets, _ in self.packs(order):
            yield make_batch(records, graphs, budgets, self.spec)

    def steps(self, order: np.ndarray, num_shards: int, start: int = 0
              ) -> Iterator[tuple[LabeledBatch, np.ndarray, int]]:
        """The steps of one pass over `order[start:]`: (batch of `num_shards` packs stacked on a leading
        axis, real (S,) float32: 1 for a pack, 0 for a padding shard, position in `order` after the step).

        The last step of a pass may have fewer packs: padding shards repeat its last pack (shapes stay
        alike) and count for nothing (`real`).
        """
        group, end = [], start
        for records, graphs, budgets, consumed in self.packs(order[start:]):
            group.append((records, graphs, budgets))
            end = start + consumed
            if len(group) == num_shards:
                yield (*stacked_step(group, num_shards, self.spec), end)
                group = []
        if group:
            yield (*stacked_step(group, num_shards, self.spec), end)


def stacked_step(group: Sequence[tuple[list[dict], list[StructureGraphs], batching.Budgets]], num_shards: int,
                 spec: DataSpec) -> tuple[LabeledBatch, np.ndarray]:
    """Packs -> (batch with a leading axis of `num_shards` shards, real (S,)); all shards take the largest
    budgets of the packs (they differ only when a structure too big for the planned budgets came alone)."""
    budgets = batching.Budgets.from_array(np.max([b.as_array() for _, _, b in group], axis=0))
    shards = [make_batch(records, graphs, budgets, spec) for records, graphs, _ in group]
    real = np.zeros(num_shards, np.float32)
    real[:len(shards)] = 1.0
    return stack_shards(shards + [shards[-1]] * (num_shards - len(shards))), real
