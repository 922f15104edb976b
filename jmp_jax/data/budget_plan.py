"""Static batch shapes from a sample of a task's structures: the structures' needs (`sample_needs`), the
budgets of one shape or of two buckets found by replaying the pipeline's packing on them (`plan_budgets`,
`plan_buckets`), and how full a batch's padded arrays are (`fill_ratios`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jmp_jax.data.pipeline import PACKING_WINDOW_PER_GRAPH
from jmp_jax.graph import batching, slots
from jmp_jax.graph.build import GraphSettings, build_structure_graphs

# Structures sampled per task to size its static budgets, passes over them when replaying the packing,
# and rounds of shrinking the budgets to what the replayed batches use.
BUDGET_SAMPLE = 96
# The most atoms-rich structures are always measured too (found from the record index's atom counts, or
# by reading sources without one that are small enough to scan), with some headroom for denser structures
# of fewer atoms, so that every structure fits a batch on its own.
LARGEST_SCANNED = 8
SCAN_LIMIT = 200_000
LARGEST_HEADROOM = 1.1
PACKING_REPLAYS = 8
BUDGET_REFINEMENTS = 3
# Two buckets: rounds of refitting each to the batches that chose it, then a local search of relative
# steps over groups of kinds that grow together, scored by the worst kind's fill plus a little of the mean.
BUCKET_REFITS = 3
SEARCH_STEPS = (0.08, 0.04, 0.02)
SEARCH_SWEEPS = 3
MEAN_FILL_WEIGHT = 0.2
KIND_GROUPS = (("nodes",), ("edges", "a2ee2a", "a2a"), ("qint",))
_KINDS = list(batching.Budgets.zeros().as_dict())
GRAPHS_SLOT = _KINDS.index("graphs")


def largest_structures(source) -> np.ndarray:
    """Indices of the structures with the most atoms (none for index-less sources too large to scan)."""
    natoms = getattr(source, "natoms", None)  # TFRecordSource: from its record index
    if natoms is None:
        if len(source) > SCAN_LIMIT:
            return np.zeros(0, np.int64)
        natoms = np.array([len(source[i]["atomic_numbers"]) for i in range(len(source))])
    # Only the records at least as large as the LARGEST_SCANNED-th largest are sorted (a full stable sort
    # takes ~1 s per 10M records); same order as sorting all: most atoms first, then the earlier record.
    k = min(LARGEST_SCANNED, len(natoms))
    candidates = np.flatnonzero(natoms >= np.partition(natoms, len(natoms) - k)[-k])
    return candidates[np.argsort(-natoms[candidates], kind="stable")[:LARGEST_SCANNED]]


@dataclasses.dataclass(frozen=True)
class BudgetSample:
    """What a task's sampled structures need, for replaying the pipeline's packing before training."""

    replay: list[batching.Budgets]  # the sample's needs, in several shuffled passes
    mean: np.ndarray  # (6,) mean need per structure, at least 1
    floor: np.ndarray  # (6,) real slots every budget keeps: the largest structure alone, with headroom
    slot_widths: dict[str, int]  # per-atom edge slots (`EdgeSlots`) that hold every sampled structure


def sample_needs(source, settings: GraphSettings, seed: int, edge_dropout: float = 0.0,
                 also_fit: Sequence = ()) -> BudgetSample:
    """Needs of BUDGET_SAMPLE random structures built as training builds them (with `edge_dropout`).

    The floor comes from structures built without dropout (validation batches have none) and includes
    the most atoms-rich structures of the source and of the sources in `also_fit` (the validation split,
    which is packed into the same shapes).
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(source), size=min(BUDGET_SAMPLE, len(source)), replace=False)

    degrees = []  # of the structures built without dropout: dropout only lowers in-degrees

    def need(i: int, dropout: float, of=source) -> np.ndarray:
        r = of[int(i)]
        g = build_structure_graphs(r["atomic_numbers"], r["positions"], r["cell"], None, r["tags"], settings,
                                   fixed=r["fixed"], name=f"record {i}", edge_dropout=dropout,
                                   rng=np.random.default_rng([seed, int(i), 3]) if dropout else None)
        if not dropout:
            degrees.append(slots.structure_in_degrees(g))
        return batching.structure_sizes(g).as_array()

    sampled = np.asarray([need(i, edge_dropout) for i in picks], np.float64)
    plain = sampled if not edge_dropout else np.asarray([need(i, 0.0) for i in picks], np.float64)
    outliers = [need(i, 0.0, of) for of in (source, *also_fit) for i in largest_structures(of)]
    floor = np.ceil(np.vstack([plain, *outliers]).max(0) * LARGEST_HEADROOM)
    order = np.concatenate([rng.permutation(len(picks)) for _ in range(PACKING_REPLAYS)])
    widths = slots.planned_widths({name: max(d[name] for d in degrees) for name in slots.SLOTTED_GRAPHS}, settings)
    return BudgetSample(replay=[batching.Budgets.from_array(sampled[k]) for k in order],
                        mean=np.maximum(sampled.mean(0), 1.0), floor=floor, slot_widths=widths)


def mixture_sample(samples: Sequence[BudgetSample], probabilities: Sequence[float], seed: int) -> BudgetSample:
    """The needs of the tasks' mixed union ("batch" task mixing), from each task's sample: the replay draws
    every structure's task with `probabilities` (then the task's next replayed structure), as the pipeline
    draws them; the floor and slot widths hold every task's structures."""
    rng = np.random.default_rng([seed, 6])
    draws = rng.choice(len(samples), size=sum(len(s.replay) for s in samples), p=probabilities)
    taken = [0] * len(samples)
    replay = []
    for t in draws:
        replay.append(samples[t].replay[taken[t] % len(samples[t].replay)])
        taken[t] += 1
    return BudgetSample(replay=replay, mean=np.sum([p * s.mean for p, s in zip(probabilities, samples)], axis=0),
                        floor=np.max([s.floor for s in samples], axis=0),
                        slot_widths={name: max(s.slot_widths[name] for s in samples) for name in slots.SLOTTED_GRAPHS})


def _replay(sample: BudgetSample, buckets, shards_per_step: int) -> tuple[np.ndarray, np.ndarray]:
    """((B, 6) totals, (B,) bucket) of the sample's replayed batches, packed as the pipeline packs."""
    window = PACKING_WINDOW_PER_GRAPH * max(b.graphs for b in buckets)
    return batching.simulate_packing(sample.replay, buckets, window, shards_per_step)


def _refit(used: np.ndarray, floor: np.ndarray, graphs: float) -> batching.Budgets:
    """Budgets shrunk to the 90th percentile of what (B, 6) batches use, never below the floor."""
    target = np.maximum(np.ceil(np.percentile(used, 90, axis=0)), floor)
    target[GRAPHS_SLOT] = graphs
    return batching.Budgets.from_array(target + 1)  # one padding slot per array


def _single_plan(sample: BudgetSample, structures_per_batch: int, shards_per_step: int) -> batching.Budgets:
    """Start proportional to the mean need, for at least `structures_per_batch` structures (and the floor);
    then shrink each kind to what the replayed batches use. Graph slots stay generous so they rarely bind."""
    multiple = max(float(structures_per_batch), float(np.max(sample.floor / sample.mean)))
    target = np.ceil(sample.mean * multiple)
    target[GRAPHS_SLOT] = 2 * np.ceil(multiple)
    budgets = batching.Budgets.from_array(target + 1)
    for _ in range(BUDGET_REFINEMENTS):
        budgets = _refit(_replay(sample, [budgets], shards_per_step)[0], sample.floor, target[GRAPHS_SLOT])
    return budgets


def replay_fill(sample: BudgetSample, buckets, shards_per_step: int = 1) -> np.ndarray:
    """(6,) mean over the sample's replayed batches of real entries / budget per kind, in each batch's bucket."""
    used, chosen = _replay(sample, buckets, shards_per_step)
    return np.mean(used / np.asarray([b.as_array() for b in buckets])[chosen], axis=0)


def _score(fill: np.ndarray) -> float:
    padded = np.delete(fill, GRAPHS_SLOT)
    return float(padded.min() + MEAN_FILL_WEIGHT * padded.mean())


def _bucket_floors(sample: BudgetSample, shards_per_step: int) -> list[np.ndarray]:
    """(6,) floor of the light and the heavy bucket. Only the heavy one must hold the largest structure
    alone when every step is one batch: a batch picks among the buckets that hold its first structure.
    With several batches per step the later ones keep the step's bucket, so both hold every structure."""
    return [sample.floor if shards_per_step > 1 else np.zeros_like(sample.floor), sample.floor]


def _split(sample: BudgetSample, single: batching.Budgets, shards_per_step: int) -> list[batching.Budgets]:
    """Two buckets: the single plan's replayed batches split at the median of a2a edges per atom (the
    largest array; dense or large structures have several times more neighbours per atom within the cutoff
    than small molecules), each refit to the batches that choose it."""
    used, _ = _replay(sample, [single], shards_per_step)
    per_atom = used[:, _KINDS.index("a2a")] / np.maximum(used[:, _KINDS.index("nodes")], 1)
    heavy = per_atom > np.median(per_atom)
    if heavy.all() or not heavy.any():
        return [single]

    floors = _bucket_floors(sample, shards_per_step)
    buckets = [_refit(used[~heavy], floors[0], single.graphs - 1), _refit(used[heavy], floors[1], single.graphs - 1)]
    for _ in range(BUCKET_REFITS):
        used, chosen = _replay(sample, buckets, shards_per_step)
        buckets = [_refit(used[chosen == j], floors[j], single.graphs - 1) if np.any(chosen == j) else b
                   for j, b in enumerate(buckets)]
    return buckets


def _search(sample: BudgetSample, buckets: list[batching.Budgets], shards_per_step: int) -> list[batching.Budgets]:
    """Local search: grow or shrink one group of kinds of one bucket by a relative step while the replayed
    fill score (`_score`) improves, with ever smaller steps."""
    groups = [[_KINDS.index(k) for k in group] for group in KIND_GROUPS]
    floors = _bucket_floors(sample, shards_per_step)
    rows = [b.as_array() for b in buckets]

    def score(candidate) -> float:
        return _score(replay_fill(sample, [batching.Budgets.from_array(r) for r in candidate], shards_per_step))

    best = score(rows)
    for step in SEARCH_STEPS:
        for _ in range(SEARCH_SWEEPS):
            improved = False
            for j in range(len(rows)):
                for group in groups:
                    for sign in (-1, 1):
                        candidate = [r.copy() for r in rows]
                        candidate[j][group] = np.maximum(np.ceil(rows[j][group] * (1 + sign * step)),
                                                         floors[j][group] + 1)
                        value = score(candidate)
                        if value > best + 1e-6:
                            best, rows, improved = value, candidate, True
            if not improved:
                break
    return [batching.Budgets.from_array(r) for r in rows]


def plan_budgets(source, settings: GraphSettings, structures_per_batch: int, seed: int, *,
                 edge_dropout: float = 0.0) -> batching.Budgets:
    """One static budget shape for a task, sized on a sample of its structures (see `_single_plan`)."""
    return _single_plan(sample_needs(source, settings, seed, edge_dropout), structures_per_batch, 1)


def plan_buckets(source, settings: GraphSettings | None, structures_per_batch: int, seed: int, *,
                 edge_dropout: float = 0.0, shards_per_step: int = 1,
                 sample: BudgetSample | None = None) -> tuple[batching.Budgets, ...]:
    """Up to two static budget shapes for a task: a light one for batches of many small structures and a
    heavy one (last) for batches of fewer, neighbour-dense ones (`_split`, then `_search`).
    Kept only if the replayed packing, which picks per step the shape it fills best, fills better than
    with one shape. Pipelines must run them with `shards_per_step` batches per step (`_bucket_floors`).
    A given `sample` (e.g. `mixture_sample`) replaces sampling `source`."""
    sample = sample or sample_needs(source, settings, seed, edge_dropout)
    single = _single_plan(sample, structures_per_batch, shards_per_step)
    split = _split(sample, single, shards_per_step)
    if len(split) < 2:
        return (single,)
    pair = _search(sample, split, shards_per_step)
    if pair[0] == pair[1] or (_score(replay_fill(sample, pair, shards_per_step))
                              <= _score(replay_fill(sample, [single], shards_per_step))):
        return (single,)
    return tuple(pair)


def fill_ratios(batch: Any, label: str) -> dict[str, float]:
    """Real entries / budget for every padded array of a (stacked) batch, and real edges / slots of every
    per-atom slot grid (`<graph>_slots`), as `fill/<label>/<kind>` (label: the task, or "mixed")."""
    g = batch.graphs
    masks = {"nodes": g.graph.nodes["mask"], "edges": g.graph.edges["mask"], "a2ee2a": g.a2ee2a.mask,
             "qint": g.qint.mask, "a2a": g.a2a.mask, "graphs": g.graph.globals["mask"]}
    # The per-atom slot grids: real edges / (atoms x slots).
    masks.update({f"{name}_slots": getattr(g, f"{name}_slots").mask for name in slots.SLOTTED_GRAPHS})
    return {f"fill/{label}/{k}": float(np.mean(np.asarray(m))) for k, m in masks.items()}
