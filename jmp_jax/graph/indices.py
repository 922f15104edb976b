"""Main-graph symmetrisation and id_swap (host side, numpy), in JMP's edge order (`backbone.symmetrize_edges`).

Edges are (senders, receivers, cell_offset) with the offset applied to the sender. The model enumerates
triplets and quadruplets densely over per-atom edge slots (`graph/slots.py`); JMP's explicit lists, used to
check that form, are built by the tests (tests/reference_interactions.py).
"""
from __future__ import annotations

import numpy as np


def symmetrize(senders: np.ndarray, receivers: np.ndarray, cell_offset: np.ndarray, *, union: bool = False):
    """Make the graph bidirectional: [edges in canonical direction, their reverses in the same order].

    An edge is in canonical direction if s < t, or s == t with a lexicographically negative offset.
    union False (JMP's): keeps the edges already in canonical direction and appends their reversed copies
      (s and t swapped, offset negated). A pair whose kNN edge points only the other way is lost, so the
      graph depends on atom order.
    union True: turns every edge into canonical direction, removes duplicates, orders them by
      (t, s, offset) and appends the reverses: the union of the graph and its reverse, whatever the order.
    Returns the symmetric (senders, receivers, cell_offset), each of length 2 * (number kept).
    """
    ox, oy, oz = cell_offset[:, 0], cell_offset[:, 1], cell_offset[:, 2]
    offset_negative = (ox < 0) | ((ox == 0) & (oy < 0)) | ((ox == 0) & (oy == 0) & (oz < 0))
    canonical = (senders < receivers) | ((senders == receivers) & offset_negative)
    if union:
        s = np.where(canonical, senders, receivers)
        t = np.where(canonical, receivers, senders)
        off = np.where(canonical[:, None], cell_offset, -cell_offset)
        order = np.lexsort((off[:, 2], off[:, 1], off[:, 0], s, t))
        rows = np.column_stack([t, s, off])[order]
        first = np.ones(rows.shape[0], dtype=bool)
        first[1:] = np.any(rows[1:] != rows[:-1], axis=1)
        s, t, off = s[order][first], t[order][first], off[order][first]
    else:
        s, t, off = senders[canonical], receivers[canonical], cell_offset[canonical]
    return np.concatenate([s, t]), np.concatenate([t, s]), np.concatenate([off, -off])


def _edge_keys(senders, receivers, cell_offset, num_atoms: int, offset_base: int) -> np.ndarray:
    """(E,) int64 key unique per (s, t, offset) for |offset| < offset_base // 2."""
    half = offset_base // 2
    cell_id = ((cell_offset[:, 0] + half) * offset_base + cell_offset[:, 1] + half) * offset_base \
        + cell_offset[:, 2] + half
    return (cell_id * num_atoms + senders) * num_atoms + receivers


def reverse_edge_index(senders: np.ndarray, receivers: np.ndarray, cell_offset: np.ndarray,
                       num_atoms: int) -> np.ndarray:
    """(E,) id_swap: index of the edge t -> s with offset -n for every edge s -> t with offset n.

    Raises ValueError if some edge has no reverse (the graph is not symmetric).
    """
    if senders.shape[0] == 0:
        return np.zeros(0, dtype=np.int64)
    offset_base = 2 * int(np.abs(cell_offset).max()) + 3
    keys = _edge_keys(senders, receivers, cell_offset, num_atoms, offset_base)
    reverse_keys = _edge_keys(receivers, senders, -cell_offset, num_atoms, offset_base)
    order = np.argsort(keys, kind="stable")
    position = np.searchsorted(keys[order], reverse_keys).clip(max=keys.shape[0] - 1)
    id_swap = order[position]
    if not np.array_equal(keys[id_swap], reverse_keys):
        raise ValueError("graph is not symmetric: some edge has no reverse edge")
    return id_swap
