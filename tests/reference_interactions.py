"""JMP's explicit triplet and quadruplet index lists of a structure (host side, numpy), to check the model's
dense slot form and the graphs against JMP (the model itself never builds them).

Each function works on one structure with local atom indices; the orders reproduce JMP's
(`interaction_indices.get_triplets / get_mixed_triplets / get_quadruplets`), so concatenating per-structure
results with offsets gives the batch order.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from jmp_jax.graph.build import StructureGraphs


def inner_index(sorted_ids: np.ndarray) -> np.ndarray:
    """(M,) rank of each entry within its run of equal ids (JMP `get_inner_idx`). ids sorted."""
    if sorted_ids.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(sorted_ids.shape[0]) - np.searchsorted(sorted_ids, sorted_ids, side="left")


def _edges_into_atoms(in_senders: np.ndarray, in_receivers: np.ndarray, query_atoms: np.ndarray,
                      num_atoms: int):
    """For every query q (in order), every input edge into atom query_atoms[q].

    Input edges of one atom come ordered by (sender, edge index): the row order of JMP's
    SparseTensor(row=target, col=source, value=edge index).
    Returns (query, edge) index pairs, each (M,), sorted by query.
    """
    by_target = np.lexsort((in_senders, in_receivers))
    counts = np.bincount(in_receivers, minlength=num_atoms)
    starts = np.cumsum(counts) - counts
    per_query = counts[query_atoms]
    query = np.repeat(np.arange(query_atoms.shape[0]), per_query)
    first_of_query = np.cumsum(per_query) - per_query
    rank = np.arange(query.shape[0]) - np.repeat(first_of_query, per_query)
    edge = by_target[np.repeat(starts[query_atoms], per_query) + rank]
    return query, edge


def triplets(senders: np.ndarray, receivers: np.ndarray, num_atoms: int):
    """e2e triplets b->a, c->a of one graph: (edge_in, edge_out), edge_out sorted.

    Every other edge into a (the same atom b = c from another image is allowed).
    """
    edge_out, edge_in = _edges_into_atoms(senders, receivers, receivers, num_atoms)
    distinct = edge_in != edge_out
    return edge_in[distinct], edge_out[distinct]


def mixed_triplets(graph_in, graph_out, num_atoms: int, to_outedge: bool = False):
    """Triplets between two graphs over the same atoms: (edge_in, edge_out), edge_out sorted.

    graph_in / graph_out: (senders, receivers, cell_offset).
    to_outedge=False: for each out edge c->a, the in edges b->a, dropping b->a equal to c->a as an
    atom pair with the same offset. to_outedge=True: for each out edge c->a, the in edges b->c,
    dropping those that return to a itself (b == a and offsets cancel).
    """
    in_s, in_t, in_off = graph_in
    out_s, out_t, out_off = graph_out
    query_atoms = out_s if to_outedge else out_t
    edge_out, edge_in = _edges_into_atoms(in_s, in_t, query_atoms, num_atoms)
    if to_outedge:
        same_atom = in_s[edge_in] == out_t[edge_out]
        net_offset = out_off[edge_out] + in_off[edge_in]
    else:
        same_atom = in_s[edge_in] == out_s[edge_out]
        net_offset = out_off[edge_out] - in_off[edge_in]
    distinct = ~same_atom | np.any(net_offset != 0, axis=1)
    return edge_in[distinct], edge_out[distinct]


def quadruplets(main, qint, num_atoms: int) -> dict[str, np.ndarray]:
    """Quadruplets d->b->a<-c (JMP `get_quadruplets`).

    main, qint: (senders, receivers, cell_offset). Returns
      triplet_in_in / triplet_in_out:   main edge d->b, qint edge b->a (sorted by qint edge)
      triplet_out_in / triplet_out_out: qint edge b->a, main edge c->a (sorted by main edge)
      out (Q,): main edge c->a (sorted), trip_in_to_quad (Q,), trip_out_to_quad (Q,).
    Quadruplets whose c and d are the same atom image are removed.
    """
    main_s, _, main_off = main
    qint_off = qint[2]
    tin_in, tin_out = mixed_triplets(main, qint, num_atoms, to_outedge=True)
    tout_in, tout_out = mixed_triplets(qint, main, num_atoms, to_outedge=False)

    # Input triplets are grouped by their qint edge; each output triplet pairs with that group.
    trip_in_per_qint = np.bincount(tin_out, minlength=qint_off.shape[0])
    trip_in_start = np.cumsum(trip_in_per_qint) - trip_in_per_qint
    reps = trip_in_per_qint[tout_in]
    trip_out_to_quad = np.repeat(np.arange(tout_in.shape[0]), reps)
    first_of_trip_out = np.cumsum(reps) - reps
    rank = np.arange(trip_out_to_quad.shape[0]) - np.repeat(first_of_trip_out, reps)
    trip_in_to_quad = np.repeat(trip_in_start[tout_in], reps) + rank

    out = tout_out[trip_out_to_quad]
    edge_db = tin_in[trip_in_to_quad]
    # c == d needs the same atom and cancelling offsets; check offsets only where atoms agree.
    same_atom = np.flatnonzero(main_s[out] == main_s[edge_db])
    edge_ba = tout_in[trip_out_to_quad[same_atom]]
    net_offset = main_off[edge_db[same_atom]] + qint_off[edge_ba] - main_off[out[same_atom]]
    distinct = np.ones(out.shape[0], dtype=bool)
    distinct[same_atom] = np.any(net_offset != 0, axis=1)
    return {
        "triplet_in_in": tin_in, "triplet_in_out": tin_out,
        "triplet_out_in": tout_in, "triplet_out_out": tout_out,
        "out": out[distinct],
        "trip_in_to_quad": trip_in_to_quad[distinct],
        "trip_out_to_quad": trip_out_to_quad[distinct],
    }


@dataclasses.dataclass(frozen=True)
class TripletArrays:
    edge_in: np.ndarray   # (T,) int64
    edge_out: np.ndarray  # (T,) int64, sorted


@dataclasses.dataclass(frozen=True)
class QuadArrays:
    triplet_in: TripletArrays     # main edge d->b, qint edge b->a
    triplet_out: TripletArrays    # qint edge b->a, main edge c->a
    edge_out: np.ndarray          # (Q,) main edge c->a, sorted
    trip_in_to_quad: np.ndarray   # (Q,) index into triplet_in
    trip_out_to_quad: np.ndarray  # (Q,) index into triplet_out


@dataclasses.dataclass(frozen=True)
class InteractionLists:
    """GemNet-OC's triplet and quadruplet index lists, as JMP builds them."""

    trip_e2e: TripletArrays  # main -> main
    trip_a2e: TripletArrays  # a2ee2a edge b->a -> main edge c->a
    trip_e2a: TripletArrays  # main edge b->a -> a2ee2a edge c->a
    quad: QuadArrays


def interaction_lists(structure: StructureGraphs) -> InteractionLists:
    """The triplet and quadruplet lists of one structure (local edge indices into its main, a2ee2a and
    qint graphs)."""
    n, main, aeea = structure.num_atoms, structure.main.topology, structure.a2ee2a.topology
    quad = quadruplets(main, structure.qint.topology, n)
    return InteractionLists(
        trip_e2e=TripletArrays(*triplets(main[0], main[1], n)),
        trip_a2e=TripletArrays(*mixed_triplets(aeea, main, n)),
        trip_e2a=TripletArrays(*mixed_triplets(main, aeea, n)),
        quad=QuadArrays(
            triplet_in=TripletArrays(quad["triplet_in_in"], quad["triplet_in_out"]),
            triplet_out=TripletArrays(quad["triplet_out_in"], quad["triplet_out_out"]),
            edge_out=quad["out"], trip_in_to_quad=quad["trip_in_to_quad"],
            trip_out_to_quad=quad["trip_out_to_quad"]))


def batch_interaction_lists(structures: Sequence[StructureGraphs]) -> InteractionLists:
    """The lists of structures batched in order: edge indices are those of `batching.collate`'s batch of
    the same structures (real edges come first, per structure, in structure order)."""
    if not structures:
        raise ValueError("batch_interaction_lists needs at least one structure")
    lists = [interaction_lists(sg) for sg in structures]

    def starts(sizes) -> np.ndarray:
        sizes = np.asarray(list(sizes), np.int64)
        return np.cumsum(sizes) - sizes

    main = starts(sg.main.num_edges for sg in structures)
    aeea = starts(sg.a2ee2a.num_edges for sg in structures)
    qint = starts(sg.qint.num_edges for sg in structures)

    def cat(get: Callable[[InteractionLists], np.ndarray], offsets: np.ndarray) -> np.ndarray:
        return np.concatenate([get(x) + o for x, o in zip(lists, offsets)])

    def trip(get: Callable[[InteractionLists], TripletArrays], in_offsets, out_offsets) -> TripletArrays:
        return TripletArrays(cat(lambda x: get(x).edge_in, in_offsets), cat(lambda x: get(x).edge_out, out_offsets))

    quad = QuadArrays(
        triplet_in=trip(lambda x: x.quad.triplet_in, main, qint),
        triplet_out=trip(lambda x: x.quad.triplet_out, qint, main),
        edge_out=cat(lambda x: x.quad.edge_out, main),
        trip_in_to_quad=cat(lambda x: x.quad.trip_in_to_quad,
                            starts(x.quad.triplet_in.edge_in.shape[0] for x in lists)),
        trip_out_to_quad=cat(lambda x: x.quad.trip_out_to_quad,
                             starts(x.quad.triplet_out.edge_in.shape[0] for x in lists)))
    return InteractionLists(trip_e2e=trip(lambda x: x.trip_e2e, main, main),
                            trip_a2e=trip(lambda x: x.trip_a2e, aeea, main),
                            trip_e2a=trip(lambda x: x.trip_e2a, main, aeea), quad=quad)
