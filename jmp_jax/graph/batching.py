"""Padded static-shape batching of StructureGraphs into a GraphBatch (host side, numpy).

Layout (see jmp_jax/graph/types.py): real entries first, in structure order, with indices offset
per structure; the rest is padding. Graph `len(structures)` is the padding graph: it owns every
padding node and every padding main edge; further padding graphs are empty. Padding edges of every
edge set join the first padding node and get shift = PADDING_SHIFT so their length is 1 Å (no 0/0 in
a model that forgets a mask). Every budget therefore needs at least one slot beyond the real entries.
No triplet or quadruplet lists are built: the model enumerates them over per-atom edge slots
(`slots.py`), whose widths follow the in-degrees, not the budgets.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping, Sequence

import jraph
import numpy as np

from jmp_jax.graph import slots
from jmp_jax.graph.build import EdgeArrays, StructureGraphs
from jmp_jax.graph.types import EdgeSet, GraphBatch

PADDING_SHIFT = np.array([0.0, 0.0, 1.0])
_INT32_MAX = np.iinfo(np.int32).max


class BudgetOverflowError(ValueError):
    """A batch needs more slots of some kind than its budget allows."""

    def __init__(self, kind: str, need: int, limit: int, what: str = ""):
        self.kind, self.need, self.limit = kind, need, limit
        where = f" ({what})" if what else ""
        super().__init__(f"budget {kind!r} exceeded: need {need} real slots + 1 padding slot, "
                         f"limit {limit}{where}")


@dataclasses.dataclass(frozen=True)
class Budgets:
    """One count per array kind of a GraphBatch.

    As a budget: the static length of each array (graphs: number of graph slots). As a need
    (`structure_sizes`, sums of them): the real entries only; a need fits a budget when every
    kind leaves at least one slot for padding.
    """

    nodes: int
    edges: int  # symmetrised main graph
    a2ee2a: int
    qint: int
    a2a: int
    graphs: int  # last: `batch_fill` leaves it out

    @classmethod
    def zeros(cls) -> "Budgets":
        return cls(**dict.fromkeys(cls.__dataclass_fields__, 0))

    @classmethod
    def from_array(cls, values) -> "Budgets":
        """From 6 counts in field order (inverse of `as_array`)."""
        return cls(*(int(v) for v in values))

    def as_array(self) -> np.ndarray:
        """(6,) int64 counts in field order."""
        return np.array([getattr(self, kind) for kind in self.__dataclass_fields__], np.int64)  # astuple: deep copies

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def __add__(self, other: "Budgets") -> "Budgets":
        return Budgets.from_array(self.as_array() + other.as_array())

    def fits_in(self, budgets: "Budgets") -> bool:
        """Whether this need leaves a padding slot in every kind of `budgets`."""
        return bool(np.all(self.as_array() + 1 <= budgets.as_array()))

    def check_fits(self, budgets: "Budgets", what: str = "") -> None:
        """Raise BudgetOverflowError for the first kind of this need that `budgets` cannot hold."""
        for kind, need in self.as_dict().items():
            if need + 1 > getattr(budgets, kind):
                raise BudgetOverflowError(kind, need, getattr(budgets, kind), what)


def structure_sizes(sg: StructureGraphs) -> Budgets:
    """What one structure needs of every kind (real entries only; graphs = 1)."""
    return Budgets(
        nodes=sg.num_atoms, edges=sg.main.num_edges, a2ee2a=sg.a2ee2a.num_edges,
        qint=sg.qint.num_edges, a2a=sg.a2a.num_edges, graphs=1)


def _total_need(structures: Sequence[StructureGraphs]) -> Budgets:
    return sum((structure_sizes(sg) for sg in structures), Budgets.zeros())


def budgets_for(structures: Sequence[StructureGraphs], *, scale: float = 1.0,
                multiple: int = 1) -> Budgets:
    """A budget that fits these structures in one batch.

    Each kind gets ceil(total * scale) + 1 padding slot, rounded up to `multiple` (so that nearby
    batches share a shape and a compiled function); graphs = len(structures) + 1.
    """
    if scale < 1.0 or multiple < 1:
        raise ValueError(f"need scale >= 1 and multiple >= 1, got scale={scale}, multiple={multiple}")
    sizes = {kind: -(-(math.ceil(total * scale) + 1) // multiple) * multiple
             for kind, total in _total_need(structures).as_dict().items()}
    sizes["graphs"] = len(structures) + 1
    return Budgets(**sizes)


def _check_fits(structures: Sequence[StructureGraphs], budgets: Budgets) -> dict[str, int]:
    """The batch's total need per kind; raises if it does not fit `budgets`."""
    need = _total_need(structures)
    names = [str(sg.name) for sg in structures]
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    need.check_fits(budgets, what=f"structures: {shown}")
    too_big = [kind for kind, limit in budgets.as_dict().items() if limit > _INT32_MAX]
    if too_big:
        raise ValueError(f"budgets {too_big} do not fit int32 indices")
    return need.as_dict()


def _offsets(structures, size_of: Callable[[StructureGraphs], int]) -> np.ndarray:
    """(S,) start of each structure's block of some kind."""
    sizes = np.array([size_of(sg) for sg in structures], dtype=np.int64)
    return np.cumsum(sizes) - sizes


def _padded_index(parts, offsets, budget: int, pad_value: int) -> np.ndarray:
    """(budget,) int32: concatenated per-structure indices + offsets, then pad_value."""
    out = np.full(budget, pad_value, dtype=np.int32)
    real = np.concatenate([np.asarray(p, np.int64) + o for p, o in zip(parts, offsets)])
    out[:real.shape[0]] = real
    return out


def _padded_rows(parts, budget: int, pad_row, dtype) -> np.ndarray:
    """(budget, ...) concatenated per-structure rows, then pad_row."""
    real = np.concatenate(parts)
    out = np.empty((budget,) + real.shape[1:], dtype=dtype)
    out[:] = pad_row
    out[:real.shape[0]] = real
    return out


def _mask(num_real: int, budget: int) -> np.ndarray:
    return np.arange(budget) < num_real


def _edge_set(structures, get: Callable[[StructureGraphs], EdgeArrays], node_offsets,
              budget: int, num_real: int, pad_node: int, dtype) -> EdgeSet:
    edges = [get(sg) for sg in structures]
    return EdgeSet(
        senders=_padded_index([e.senders for e in edges], node_offsets, budget, pad_node),
        receivers=_padded_index([e.receivers for e in edges], node_offsets, budget, pad_node),
        shift=_padded_rows([e.shift for e in edges], budget, PADDING_SHIFT, dtype),
        mask=_mask(num_real, budget))


def _graphs_tuple(structures, main: EdgeSet, need: dict[str, int], b: Budgets,
                  dtype) -> jraph.GraphsTuple:
    """Nodes and per-graph counts; graph len(structures) is the padding graph."""
    num_graphs = len(structures)
    n_node = np.zeros(b.graphs, np.int32)
    n_node[:num_graphs] = [sg.num_atoms for sg in structures]
    n_node[num_graphs] = b.nodes - need["nodes"]
    n_edge = np.zeros(b.graphs, np.int32)
    n_edge[:num_graphs] = [sg.main.num_edges for sg in structures]
    n_edge[num_graphs] = b.edges - need["edges"]

    def rows(key: str, pad, row_dtype):
        return _padded_rows([getattr(sg, key) for sg in structures], b.nodes, pad, row_dtype)

    nodes = {"atomic_numbers": rows("atomic_numbers", 0, np.int32),
             "positions": rows("positions", 0.0, dtype), "tags": rows("tags", 0, np.int32),
             "fixed": rows("fixed", False, bool), "mask": _mask(need["nodes"], b.nodes)}
    return jraph.GraphsTuple(
        nodes=nodes, edges={"shift": main.shift, "mask": main.mask}, senders=main.senders,
        receivers=main.receivers, n_node=n_node, n_edge=n_edge,
        globals={"mask": _mask(num_graphs, b.graphs)})


def collate(structures: Sequence[StructureGraphs], budgets: Budgets, *, dtype=np.float32,
            slot_widths: Mapping[str, int] | None = None) -> GraphBatch:
    """Pad and batch structures into one GraphBatch of static shapes set by `budgets`.

    The per-atom edge slots (`EdgeSlots`) are as wide as the largest in-degree, at least `slot_widths`,
    rounded up (`slots.bucketed_widths`), so a task sees one or a few slot shapes.

    Raises BudgetOverflowError if any kind needs more than budget - 1 slots (or the batch has more
    than budgets.graphs - 1 structures). dtype: float type of positions and shifts.
    """
    if not structures:
        raise ValueError("collate needs at least one structure")
    need = _check_fits(structures, budgets)
    b = budgets
    node_off = _offsets(structures, lambda sg: sg.num_atoms)
    main_off = _offsets(structures, lambda sg: sg.main.num_edges)
    pad_node = need["nodes"]  # the first padding node

    def edge_set(get, budget: int, num_real: int) -> EdgeSet:
        return _edge_set(structures, get, node_off, budget, num_real, pad_node, dtype)

    main = edge_set(lambda sg: sg.main, b.edges, need["edges"])
    # Padding main edges are their own reverse, so id_swap never leaves the padding block.
    id_swap = _padded_index([sg.id_swap for sg in structures], main_off, b.edges, 0)
    id_swap[need["edges"]:] = np.arange(need["edges"], b.edges)
    others = {name: edge_set(lambda sg: getattr(sg, name), getattr(b, name), need[name])
              for name in ("a2ee2a", "qint", "a2a")}
    edges = {"main": (main.receivers, main.mask), **{k: (e.receivers, e.mask) for k, e in others.items()}}
    layouts = slots.slot_layouts(edges, b.nodes, slots.bucketed_widths(edges, b.nodes, slot_widths))
    return GraphBatch(graph=_graphs_tuple(structures, main, need, b, dtype), id_swap=id_swap, **others,
                      **layouts)


def first_fit(needs: Sequence[Budgets], budgets: Budgets) -> list[int]:
    """Indices of `needs` packed in order: each is taken if it still fits next to those taken before it.

    A padding slot of every kind stays free (see `Budgets.fits_in`); the first need is taken whenever it
    fits an empty batch.
    """
    return _first_fit(_rows(needs).tolist(), budgets.as_array().tolist())


def _rows(needs: Sequence[Budgets]) -> np.ndarray:
    """(n, 6) counts of `needs`."""
    return np.asarray([n.as_array() for n in needs], np.int64).reshape(len(needs), -1)


def _first_fit(rows: Sequence[Sequence[int]], budgets: Sequence[int]) -> list[int]:
    """`first_fit` on n needs and a budget, 6 counts each. In Python ints: a packing window holds few rows, and
    numpy's per-call overhead on 6-vectors costs several times the arithmetic."""
    room = [int(b) - 1 for b in budgets]
    taken = []
    for i, need in enumerate(rows):
        if all(n <= r for n, r in zip(need, room)):
            room = [r - n for r, n in zip(room, need)]
            taken.append(i)
    return taken


def batch_fill(used: np.ndarray, budgets: np.ndarray) -> float:
    """Mean over the padded kinds (every kind but graph slots, the last) of real entries / budget; (6,) arrays."""
    return float(np.mean(used[:-1] / budgets[:-1]))


def pack_window(needs: Sequence[Budgets], buckets: Sequence[Budgets],
                bucket: int | None = None) -> tuple[int, list[int]]:
    """(bucket index, indices of `needs` first-fit packed into it).

    bucket None: of the buckets whose empty batch holds needs[0] (the first in line is never passed
    over), the one the packed batch fills best (`batch_fill`); none: (last bucket, []). A given bucket is packed
    as it is, possibly passing over needs[0] (later shards of a step must keep the step's shape).
    """
    return _pack_rows(_rows(needs).tolist(), np.asarray([b.as_array() for b in buckets]), bucket)


def _pack_rows(rows: list[list[int]], buckets: np.ndarray, bucket: int | None) -> tuple[int, list[int]]:
    """`pack_window` on n needs (6 counts each) and (J, 6) buckets."""
    if bucket is not None:
        return bucket, _first_fit(rows, buckets[bucket].tolist())
    best, best_fill = (len(buckets) - 1, []), -1.0
    for j, budgets in enumerate(buckets):
        picked = _first_fit(rows, budgets.tolist())
        if not picked or picked[0] != 0:
            continue
        fill = batch_fill(np.sum([rows[i] for i in picked], axis=0), budgets)
        if fill > best_fill:
            best, best_fill = (j, picked), fill
    return best


def simulate_packing(needs: Sequence[Budgets], buckets: Sequence[Budgets], window: int,
                     shards_per_step: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """((B, 6) totals, (B,) bucket index) of the batches that the input pipeline's packing (first fit over
    `window` candidates with deferral, `pack_window`, one bucket per step of `shards_per_step` batches)
    makes from `needs` in order; used to size budgets before training."""
    rows, bucket_rows = _rows(needs), np.asarray([b.as_array() for b in buckets])
    row_lists = rows.tolist()
    deferred: list[int] = []
    cursor, totals, chosen = 0, [], []
    while cursor < len(rows) or deferred:
        examined = deferred + list(range(cursor, min(cursor + max(window - len(deferred), 0), len(rows))))
        step_bucket = None if len(chosen) % shards_per_step == 0 else chosen[-1]
        bucket, picked = _pack_rows([row_lists[i] for i in examined], bucket_rows, step_bucket)
        if not picked:
            raise BudgetOverflowError("any", 0, 0, "simulate_packing: a structure never fits")
        totals.append(rows[[examined[i] for i in picked]].sum(axis=0))
        chosen.append(bucket)
        taken = {examined[i] for i in picked}
        deferred = [p for p in examined if p not in taken]
        cursor = max([cursor - 1, *examined]) + 1
    return np.asarray(totals), np.asarray(chosen)


def bucket_size(n: int, minimum: int = 8) -> int:
    """Smallest 2^k or 3 * 2^(k-1) that is >= max(n, minimum): at most 1.5x padding, few distinct sizes."""
    n = max(int(n), minimum, 1)
    power = 1 << (n - 1).bit_length()
    return 3 * power // 4 if 3 * power // 4 >= n else power


def bucketed_budgets(structures: Sequence[StructureGraphs]) -> Budgets:
    """Budgets holding these structures plus one padding slot per kind, each rounded up by `bucket_size`."""
    need = sum((structure_sizes(sg) for sg in structures), Budgets.zeros())
    sizes = {kind: bucket_size(count + 1) for kind, count in need.as_dict().items()}
    sizes["graphs"] = bucket_size(len(structures) + 1, minimum=2)
    return Budgets(**sizes)
