"""Mixed-task input pipeline: deterministic task streams, temperature sampling, packing into padded batches.

Two ways to mix the tasks (p_i ∝ n_i^(1/T)), `task_mixing`:
- "batch" (JMP's): every structure in line is drawn from the temperature-mixed union of the tasks, so each
  batch packs structures of several tasks; all tasks share the budget shapes planned on the mixture.
- "step": every step draws one task and packs that task's next structures, in the task's own shapes.
Either way a step packs `num_batch_shards` padded batches of one static budget shape ("bucket", at most a
few: each is one compiled step), the one the step's first batch fills best. Each batch shard is a "lane"
with its own share of every task's records and its own packing state, so the global batch of a step is the
same whether one process packs every lane or many processes pack some each (`jax.distributed`: see
`Pipeline._produce` for how they agree on the step's shape). The whole state is a few integers per lane
(step, draws, per-task cursors and deferred positions), so a resumed run sees exactly the batches of an
uninterrupted one. Graphs are built ahead on worker threads; batches are prefetched on a background thread.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import queue
import threading
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from jmp_jax.graph import batching, slots
from jmp_jax.graph.build import GraphSettings, build_structure_graphs
from jmp_jax.data.process_exchange import ProcessExchange, Stopped
from jmp_jax.data.types import LabeledBatch

RecordSource = Any  # len() and [i] -> record dict (see jmp_jax.data.records for the schema)

# Structures examined per batch, per graph slot of the budget, when packing.
PACKING_WINDOW_PER_GRAPH = 2
TASK_MIXING = ("batch", "step")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How one task's structures become batches."""

    name: str
    settings: GraphSettings
    # The task's static batch shapes; a lone Budgets means one shape.
    buckets: tuple[batching.Budgets, ...] | batching.Budgets
    # Per-element reference energies (index Z) subtracted from the label, as JMP's lin_ref; None keeps raw energies.
    linear_reference: np.ndarray | None = None
    # Least per-atom edge slots of each edge set (see `slots.bucketed_widths`): planned from the sample so
    # that every batch of the task has the same slot shape; None sizes them per batch.
    slot_widths: Mapping[str, int] | None = None

    def __post_init__(self):
        buckets = (self.buckets,) if isinstance(self.buckets, batching.Budgets) else tuple(self.buckets)
        if not buckets:
            raise ValueError(f"task {self.name!r} has no budgets")
        object.__setattr__(self, "buckets", buckets)

    @property
    def window(self) -> int:
        """Structures examined per batch when packing."""
        return PACKING_WINDOW_PER_GRAPH * max(b.graphs for b in self.buckets)


def temperature_probabilities(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """p_i = (n_i / Σn)^(1/T) / Σ_j (n_j / Σn)^(1/T)  (JMP's temperature sampling, docs/jmp_spec.md §3.4)."""
    frac = np.asarray(sizes, np.float64) / np.sum(sizes)
    p = frac ** (1.0 / temperature)
    return p / p.sum()


class TaskStream:
    """One lane's endless, epoch-wise shuffled order of one task's records, with graphs built ahead.

    The epochs' permutations, one after the other, are shared by all lanes: lane k takes its entries k,
    k + num_lanes, ... (so lanes may outnumber records, and an epoch's last records go to the first lanes).
    """

    def __init__(self, source: RecordSource, spec: TaskSpec, *, seed: int, task_index: int, shuffle: bool,
                 edge_dropout: float, lane: int, num_lanes: int, executor: concurrent.futures.Executor,
                 lookahead: int):
        if not len(source):
            raise ValueError(f"task {spec.name!r} has no records")
        self.source, self.spec = source, spec
        self.seed, self.task_index, self.shuffle = seed, task_index, shuffle
        self.edge_dropout = edge_dropout
        self.lane, self.num_lanes = lane, num_lanes
        self.executor, self.lookahead = executor, lookahead
        self.cursor = 0
        self.deferred: list[int] = []
        self._futures: dict[int, concurrent.futures.Future] = {}
        self._order_cache: tuple[int, np.ndarray] | None = None

    def record_index(self, position: int) -> int:
        n = len(self.source)
        epoch, k = divmod(self.lane + self.num_lanes * position, n)
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = (np.random.default_rng([self.seed, self.task_index, epoch]).permutation(n)
                     if self.shuffle else np.arange(n))
            self._order_cache = (epoch, order)
        return int(self._order_cache[1][k])

    def _build(self, position: int, index: int):
        record = self.source[index]
        rng = (np.random.default_rng([self.seed, self.task_index, self.lane, position, 1]) if self.edge_dropout
               else None)
        graphs = build_structure_graphs(
            record["atomic_numbers"], record["positions"], record["cell"], None, record["tags"],
            self.spec.settings, fixed=record["fixed"], edge_dropout=self.edge_dropout, rng=rng,
            name=f"{self.spec.name} record {index} ({record.get('source_id', '?')})")
        return record, graphs

    def get(self, position: int):
        """(record, StructureGraphs) at `position`; keeps the next `lookahead` builds under way."""
        for p in range(self.cursor, self.cursor + self.lookahead):
            if p not in self._futures:
                self._futures[p] = self.executor.submit(self._build, p, self.record_index(p))
        if position not in self._futures:
            self._futures[position] = self.executor.submit(self._build, position, self.record_index(position))
        return self._futures[position].result()

    def candidates(self, window: int) -> list[int]:
        """Positions a batch may take, in order: structures deferred by earlier batches, then new ones."""
        return self.deferred + list(range(self.cursor, self.cursor + max(window - len(self.deferred), 0)))

    def release(self, taken: Sequence[int]):
        """Forget the graphs of positions that went into a batch."""
        for p in taken:
            self._futures.pop(p, None)

    def commit(self, examined: Sequence[int], taken: Sequence[int]):
        """Examined positions that were not taken wait, first in line, for the next batch."""
        taken = set(taken)
        self.release(taken)
        self.deferred = [p for p in examined if p not in taken]
        self.cursor = max([self.cursor - 1, *examined]) + 1

    def seek(self, cursor: int, deferred: Sequence[int] = ()):
        for f in self._futures.values():
            f.cancel()
        self._futures.clear()
        self.cursor, self.deferred = cursor, list(deferred)


def label_arrays(records: Sequence[dict], budgets: batching.Budgets,
                 linear_reference: np.ndarray | None | list) -> tuple[np.ndarray, np.ndarray]:
    """Padded energy (G,) and forces (N, 3) in the node/graph order `batching.collate` uses.

    linear_reference: one for every record, or a list of one per record (mixed-task batches).
    """
    references = linear_reference if isinstance(linear_reference, list) else [linear_reference] * len(records)
    energy = np.zeros(budgets.graphs, np.float32)
    forces = np.zeros((budgets.nodes, 3), np.float32)
    start = 0
    for i, (r, reference) in enumerate(zip(records, references)):
        e = float(r["energy"])
        if reference is not None:
            e -= float(reference[np.asarray(r["atomic_numbers"])].sum())
        energy[i] = e
        n = len(r["atomic_numbers"])
        forces[start:start + n] = r["forces"]
        start += n
    return energy, forces


def target_array(records: Sequence[dict], budgets: batching.Budgets, name: str) -> np.ndarray:
    """Padded (G,) values of the scalar target `name` (record["targets"][name]), in collate's graph order."""
    values = np.zeros(budgets.graphs, np.float32)
    for i, r in enumerate(records):
        targets = r.get("targets", {})
        if name not in targets:
            raise ValueError(f"record {r.get('source_id', '?')!r} has no target {name!r} "
                           f"(it has {sorted(targets)})")
        values[i] = targets[name]
    return values


def stack_shards(shards: Sequence[LabeledBatch], widths: dict[str, int] | None = None) -> LabeledBatch:
    """Batch shards of equal budgets -> one batch with a leading shard axis.

    A structure denser than the planned slot widths widens its shard's slots: all are widened alike, to
    `widths` if given (at least the shards' own widest), else to the shards' widest.
    """
    widths = widths or slots.common_widths([shard.graphs for shard in shards])
    shards = [shard if slots.widths_of(shard.graphs) == widths
              else shard.replace(graphs=slots.with_slots(shard.graphs, widths)) for shard in shards]
    return jax.tree.map(lambda *xs: np.stack(xs), *shards)


@dataclasses.dataclass
class Lane:
    """What one batch shard of every step packs from: its own stream of every task, and ("batch" mixing)
    its draws from the mixed union with the (task, position) pairs deferred by its last batch."""

    index: int
    streams: list[TaskStream]
    draws: int = 0
    deferred: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    def state(self) -> dict:
        return {"draws": self.draws, "deferred": [list(c) for c in self.deferred],
                "cursors": {s.spec.name: {"cursor": s.cursor, "deferred": list(s.deferred)} for s in self.streams}}

    def seek(self, state: dict):
        self.draws = int(state.get("draws", 0))
        self.deferred = [(int(t), int(p)) for t, p in state.get("deferred", [])]
        for stream in self.streams:
            position = state["cursors"][stream.spec.name]
            stream.seek(int(position["cursor"]), [int(p) for p in position["deferred"]])


def merge_states(states: Sequence[dict]) -> dict:
    """One pipeline state holding every lane, from the states of the processes' pipelines at one step."""
    steps = {s["step"] for s in states}
    if len(steps) != 1:
        raise ValueError(f"pipeline states of different steps {sorted(steps)} cannot be merged")
    return {"step": steps.pop(), "lanes": {k: v for s in states for k, v in s["lanes"].items()}}


class Pipeline:
    """Iterator of (task_index, stacked LabeledBatch of numpy arrays); `state()` / `restore()` for resume.

    task_mixing "batch" (the run configs' default, `data.task_mixing`): task_index is None and
    `LabeledBatch.task` holds each structure's task; every TaskSpec must carry the same buckets and slot
    widths (planned on the mixture, `task_data.load_tasks`). "step" (this constructor's default): one task
    per step, task_index its index.

    lanes: the batch shards (rows of the global batch) this process packs; default all of them.
    Under `jax.distributed` each process packs its own rows, and `exchange` (a `ProcessExchange`) makes
    every process agree on the step's shape; `name` keeps its keys apart from other pipelines'.
    """

    def __init__(self, tasks: Sequence[TaskSpec], sources: Sequence[RecordSource], *, seed: int,
                 temperature: float, num_batch_shards: int, edge_dropout: float = 0.0, shuffle: bool = True,
                 num_workers: int = 2, prefetch: int = 2, lanes: Sequence[int] | None = None,
                 exchange: ProcessExchange | None = None, name: str = "pipeline",
                 task_probabilities: Sequence[float] | None = None, task_mixing: str = "step"):
        if task_mixing not in TASK_MIXING:
            raise ValueError(f"task_mixing {task_mixing!r} is not one of {TASK_MIXING}")
        lanes = list(range(num_batch_shards)) if lanes is None else sorted(int(k) for k in lanes)
        if not lanes or not set(lanes) <= set(range(num_batch_shards)) or (exchange is None
                                                                          and len(lanes) != num_batch_shards):
            raise ValueError(f"pipeline {name!r}: lanes {lanes} are not a part of the {num_batch_shards} batch "
                             "shards (all of them without a process exchange)")
        self.tasks = list(tasks)
        if task_mixing == "batch" and len({(t.buckets, str(t.slot_widths)) for t in self.tasks}) > 1:
            raise ValueError(f"task_mixing 'batch': tasks {[t.name for t in self.tasks]} must share buckets "
                             "and slot widths")
        self.mixed = task_mixing == "batch"
        self.seed, self.num_batch_shards = seed, num_batch_shards
        self.exchange, self.name = exchange, name
        self.probabilities = (np.asarray(task_probabilities, np.float64) if task_probabilities is not None
                              else temperature_probabilities([len(s) for s in sources], temperature))
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(num_workers, 1))
        lookahead = 2 * max(t.window for t in self.tasks)
        self.lanes = [Lane(k, [TaskStream(src, spec, seed=seed, task_index=i, shuffle=shuffle,
                                          edge_dropout=edge_dropout, lane=k, num_lanes=num_batch_shards,
                                          executor=self._executor, lookahead=lookahead)
                               for i, (spec, src) in enumerate(zip(self.tasks, sources))])
                      for k in lanes]
        self.step = 0
        # Restores so far: the exchange's keys of a rewound pipeline never meet those of its earlier passes.
        self._generation = 0
        self._prefetch = prefetch
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._consumed_state = self._state_now()

    # ---- deterministic production -------------------------------------------------------------
    def task_of_step(self, step: int) -> int:
        return int(np.random.default_rng([self.seed, step, 2]).choice(len(self.tasks), p=self.probabilities))

    def task_of_draw(self, draw: int, lane: int = 0) -> int:
        """Task of the `draw`-th structure of a lane's mixed union ("batch" mixing)."""
        return int(np.random.default_rng([self.seed, draw, 4, lane]).choice(len(self.tasks),
                                                                            p=self.probabilities))

    def _candidates(self, lane: Lane, task: int | None) -> list[tuple[int, int]]:
        """(task, position) pairs a batch may take, in order: deferred ones first, then new ones."""
        if task is not None:
            return [(task, p) for p in lane.streams[task].candidates(self.tasks[task].window)]
        next_position = [stream.cursor for stream in lane.streams]
        out = list(lane.deferred)
        for draw in range(lane.draws, lane.draws + max(self.tasks[0].window - len(lane.deferred), 0)):
            t = self.task_of_draw(draw, lane.index)
            out.append((t, next_position[t]))
            next_position[t] += 1
        return out

    def _commit(self, lane: Lane, task: int | None, examined: list[tuple[int, int]], picked: Sequence[int]):
        """Advance past the examined candidates; those not taken wait, first in line, for the next batch."""
        if task is not None:
            lane.streams[task].commit([p for _, p in examined], [examined[i][1] for i in picked])
            return
        for t, p in examined[len(lane.deferred):]:  # the new draws, in order
            lane.streams[t].cursor = p + 1
        lane.draws += len(examined) - len(lane.deferred)
        for i in picked:
            lane.streams[examined[i][0]].release([examined[i][1]])
        taken = set(picked)
        lane.deferred = [c for i, c in enumerate(examined) if i not in taken]

    def _pack_one(self, lane: Lane, task: int | None, bucket: int | None) -> tuple[LabeledBatch, int]:
        """First-fit packing over a short window of a lane's stream (one task's, or the mixed union's for
        task None); what does not fit waits in line.

        Looking a few structures ahead fills the budgets far better than stopping at the first overflow,
        and the deferred positions are part of the saved state, so resuming stays exact.
        bucket None: the bucket this batch fills best (`batching.pack_window`); returns it with the batch.
        """
        spec = self.tasks[0 if task is None else task]
        examined = self._candidates(lane, task)
        built = [lane.streams[t].get(p) for t, p in examined]
        needs = [batching.structure_sizes(graphs) for _, graphs in built]
        bucket, picked = batching.pack_window(needs, spec.buckets, bucket)
        if not picked:  # the first in line does not fit an empty batch of any usable bucket: it never will
            what = (f"task {self.tasks[examined[0][0]].name!r} structure {built[0][0].get('source_id')}, "
                    f"budget shape {bucket + 1} of {len(spec.buckets)}")
            needs[0].check_fits(spec.buckets[bucket], what=what)
        records = [built[i][0] for i in picked]
        chosen = [built[i][1] for i in picked]
        structure_tasks = [examined[i][0] for i in picked]
        self._commit(lane, task, examined, picked)
        budgets = spec.buckets[bucket]
        graph_batch = batching.collate(chosen, budgets, slot_widths=spec.slot_widths)
        energy, forces = label_arrays(records, budgets, [self.tasks[t].linear_reference for t in structure_tasks])
        graph_task = np.zeros(budgets.graphs, np.int32)
        graph_task[:len(structure_tasks)] = structure_tasks
        return LabeledBatch(graphs=graph_batch, energy=energy, forces=forces,
                            task=graph_task if task is None else None), bucket

    def _produce(self):
        """The step's batches of this process's lanes, in the step's shape.

        The shape must not depend on how the lanes are spread over processes: the bucket is the one lane 0's
        batch fills best, and every slot grid as wide as the widest of all lanes' batches (a structure
        denser than the planned slot widths widens its batch's slots). Under `jax.distributed` the process
        packing lane 0 sends its bucket to the others, and all processes exchange their widest slots: two
        small values per step through the coordination service (`ProcessExchange`), from this producer
        thread, so the exchange overlaps the training step. Deciding without communication would need every
        process to build every lane's graphs (the packing depends on them), which does not scale with hosts.
        """
        task = None if self.mixed else self.task_of_step(self.step)
        key = f"{self.name}/{self._generation}/{self.step}/"
        shards, bucket = {}, None
        if self.lanes[0].index == 0:
            shards[0], bucket = self._pack_one(self.lanes[0], task, None)
            if self.exchange is not None:
                self.exchange.publish(key + "bucket", bucket)
        else:
            bucket = self.exchange.read(key + "bucket", self._stop)
        for lane in self.lanes:
            if lane.index not in shards:
                shards[lane.index] = self._pack_one(lane, task, bucket)[0]
        shards = [shards[lane.index] for lane in self.lanes]
        widths = slots.common_widths([shard.graphs for shard in shards])
        if self.exchange is not None:
            everyone = self.exchange.allgather(key + "widths", widths, self._stop)
            widths = {name: max(w[name] for w in everyone) for name in slots.SLOTTED_GRAPHS}
            # Every process has read the keys of two steps back: they went before its last step's values.
            self.exchange.delete_mine(f"{self.name}/{self._generation}/{self.step - 2}/")
        batch = stack_shards(shards, widths)
        self.step += 1
        return task, batch, self._state_now()

    def _state_now(self) -> dict:
        return {"step": self.step, "lanes": {str(lane.index): lane.state() for lane in self.lanes}}

    # ---- iteration with a background producer -------------------------------------------------
    def _worker(self):
        try:
            while not self._stop.is_set():
                item = self._produce()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Stopped:  # close() while waiting for another process's value
            return
        except BaseException as e:  # surfaced to the consumer, which re-raises it
            self._queue.put(e)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[int | None, LabeledBatch]:
        if self._queue is None:
            self._queue = queue.Queue(maxsize=self._prefetch)
            self._stop.clear()
            self._thread = threading.Thread(target=self._worker, daemon=True)
            self._thread.start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        task, batch, state = item
        self._consumed_state = state
        return task, batch

    def state(self) -> dict:
        """Position of this process's lanes after the last batch handed out (not after prefetched ones);
        `merge_states` joins the states of all processes."""
        return {"step": self._consumed_state["step"], "lanes": dict(self._consumed_state["lanes"])}

    def restore(self, state: dict):
        """Back to `state` (of this pipeline's lanes, or of more: e.g. every lane of a run's processes)."""
        self.close()
        missing = [lane.index for lane in self.lanes if str(lane.index) not in state.get("lanes", {})]
        if missing:
            raise ValueError(f"pipeline {self.name!r}: the saved input position has no batch shards {missing} "
                             f"(it has {sorted(state.get('lanes', {}), key=int)}): was it saved with another "
                             "data.num_batch_shards?")
        self.step = int(state["step"])
        for lane in self.lanes:
            lane.seek(state["lanes"][str(lane.index)])
        if self.exchange is not None:
            self.exchange.delete_mine(f"{self.name}/")
        self._generation += 1
        self._consumed_state = self._state_now()

    def close(self):
        if self._queue is not None:
            self._stop.set()
            self._thread.join()
            self._queue = None
