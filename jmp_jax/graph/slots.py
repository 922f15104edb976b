"""Per-atom slot layout of an edge set (host, numpy): the dense form the model's interactions use.

Every triplet of GemNet-OC pairs two edges into the same atom, and every quadruplet pairs the edges into
the two ends of a `qint` edge. Laying the edges into each atom out as a (num_nodes, width) grid turns
all of them into small dense contractions per atom (see `jmp_jax.models.interactions`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from jmp_jax.graph.types import EdgeSlots, GraphBatch


def in_degree(receivers: np.ndarray, mask: np.ndarray, num_nodes: int) -> np.ndarray:
    """(N,) number of real edges into each atom."""
    return np.bincount(np.asarray(receivers)[np.asarray(mask, bool)], minlength=num_nodes)


def edge_slots(receivers: np.ndarray, mask: np.ndarray, num_nodes: int, width: int,
               name: str = "edges") -> EdgeSlots:
    """Slot layout of the real edges (`mask`) into each of `num_nodes` atoms, `width` slots per atom.

    Slots of one atom follow edge order. Raises ValueError naming `name` if an atom has more than
    `width` incoming edges (budgets size `width` to the largest in-degree, so this never truncates).
    """
    receivers, mask = np.asarray(receivers), np.asarray(mask, bool)
    num_edges = receivers.shape[0]
    real = np.flatnonzero(mask)
    order = real[np.argsort(receivers[real], kind="stable")]
    target = receivers[order]
    rank = np.arange(order.shape[0]) - np.searchsorted(target, target, side="left")
    if rank.size and rank.max() >= width:
        atom = int(target[np.argmax(rank)])
        raise ValueError(f"{name}: atom {atom} has {int(rank.max()) + 1} incoming edges, more than the "
                         f"{width} slots per atom of the budget")
    edge = np.full((num_nodes, width), num_edges, np.int32)
    edge[target, rank] = order
    slot_of_edge = np.full(num_edges, num_nodes * width, np.int32)
    slot_of_edge[order] = target * width + rank
    return EdgeSlots(edge=edge, mask=edge < num_edges, slot_of_edge=slot_of_edge)


SLOTTED_GRAPHS = ("main", "a2ee2a", "qint", "a2a")


def graph_edges(batch: GraphBatch, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(receivers, mask) of one of the batch's edge sets."""
    if name == "main":
        return np.asarray(batch.graph.receivers), np.asarray(batch.graph.edges["mask"])
    edges = getattr(batch, name)
    return np.asarray(edges.receivers), np.asarray(edges.mask)


def structure_in_degrees(structure) -> dict[str, int]:
    """Largest in-degree of each edge set of one `StructureGraphs`."""
    return {name: int(np.bincount(getattr(structure, name).receivers, minlength=1).max())
            for name in SLOTTED_GRAPHS}


# (receivers, mask) of each edge set of a batch, by name (SLOTTED_GRAPHS).
EdgeLists = Mapping[str, tuple[np.ndarray, np.ndarray]]


def max_in_degrees(edges: EdgeLists, num_nodes: int) -> dict[str, int]:
    """Largest in-degree of each edge set over `num_nodes` atoms."""
    return {name: int(in_degree(*edges[name], num_nodes).max(initial=0)) for name in SLOTTED_GRAPHS}


# Slot widths are rounded up to a multiple of this, so batches of similar structures share one shape.
SLOT_WIDTH_STEP = 4
# Headroom over the largest in-degree of a sample of periodic structures, whose degrees a sample does not
# bound (molecules' degrees are bounded by their atom count, which the planning scans exactly).
PERIODIC_WIDTH_HEADROOM = 1.1


def round_width(width: float) -> int:
    return int(-(-max(int(np.ceil(width)), 1) // SLOT_WIDTH_STEP) * SLOT_WIDTH_STEP)


def planned_widths(sample_degrees: Mapping[str, int], settings) -> dict[str, int]:
    """Slot widths for a task from the largest in-degrees of its sampled structures (`GraphSettings`).

    Under the strict cap the kNN-capped graphs (a2ee2a, qint, a2a) never exceed their caps; tie-keeping
    caps and the symmetrised main graph can. Periodic structures get headroom, so that the task keeps
    one slot shape.
    """
    caps = dataclasses.asdict(settings.caps())
    periodic = settings.pbc is None or any(settings.pbc)
    headroom = PERIODIC_WIDTH_HEADROOM if periodic else 1.0
    widths = {}
    for name in SLOTTED_GRAPHS:
        width = round_width(sample_degrees[name] * headroom)
        capped = name != "main" and settings.tie_tolerance is None
        widths[name] = min(width, caps[name]) if capped else width
    return widths


def bucketed_widths(edges: EdgeLists, num_nodes: int, minimum: Mapping[str, int] | None = None) -> dict[str, int]:
    """Slots per atom of each edge set: its largest in-degree (at least `minimum`), rounded up to a
    multiple of SLOT_WIDTH_STEP."""
    degrees = max_in_degrees(edges, num_nodes)
    return {name: round_width(max(degrees[name], (minimum or {}).get(name, 0))) for name in SLOTTED_GRAPHS}


def widths_of(batch: GraphBatch) -> dict[str, int]:
    """Slots per atom of each edge set of a batch that carries slots."""
    return {name: getattr(batch, f"{name}_slots").edge.shape[1] for name in SLOTTED_GRAPHS}


def common_widths(batches) -> dict[str, int]:
    """The widest slot layout of each edge set over batches that carry slots."""
    each = [widths_of(b) for b in batches]
    return {name: max(w[name] for w in each) for name in SLOTTED_GRAPHS}


def slot_layouts(edges: EdgeLists, num_nodes: int, widths: Mapping[str, int] | None = None) -> dict[str, EdgeSlots]:
    """The `<name>_slots` fields of a GraphBatch: every edge set laid out with `widths[name]` slots per
    atom; widths default to the largest in-degrees."""
    widths = dict(widths) if widths is not None else max_in_degrees(edges, num_nodes)
    return {f"{name}_slots": edge_slots(*edges[name], num_nodes, max(widths[name], 1), name=f"{name} graph")
            for name in SLOTTED_GRAPHS}


def with_slots(batch: GraphBatch, widths: Mapping[str, int] | None = None) -> GraphBatch:
    """The batch laid out again with `widths` slots per atom (default: the largest in-degrees)."""
    edges = {name: graph_edges(batch, name) for name in SLOTTED_GRAPHS}
    return batch.replace(**slot_layouts(edges, batch.num_nodes, widths))
