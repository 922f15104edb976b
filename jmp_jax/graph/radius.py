"""Radius graphs and nearest-k neighbour caps for one structure (host side, numpy).

Edge convention (JMP's): an edge s -> t carries an integer cell offset n applied to the SOURCE,
    D_st = pos[t] - pos[s] - n @ cell,   vector = D_st / |D_st|.
Edges are ordered by (target, source, cell offset lexicographic), which is the order JMP's
`radius_graph_pbc` enumerates them in; the nearest-k sub-selections below keep that order.
"""
from __future__ import annotations

import sys

import numpy as np


def _import_vesin():
    """vesin, imported without torch: vesin imports an installed torch only to accept torch tensors (we pass
    numpy), and that costs every process ~2 s and ~300 MB. torch stays importable afterwards."""
    if "torch" in sys.modules:
        import vesin
        return vesin
    sys.modules["torch"] = None  # makes `import torch` raise ImportError inside vesin's import
    try:
        import vesin
    finally:
        del sys.modules["torch"]
    return vesin


vesin = _import_vesin()

# JMP drops pairs with d^2 <= 1e-4 (an atom and its own zero-offset copy, or overlapping atoms).
MIN_DISTANCE_SQ = 1e-4
# vesin is asked for a slightly larger cutoff; the exact d^2 <= r^2 test is applied here.
_SEARCH_MARGIN = 1e-6


def edge_geometry(positions: np.ndarray, cell: np.ndarray, senders: np.ndarray,
                  receivers: np.ndarray, cell_offset: np.ndarray):
    """Shift, distance and unit vector of each edge.

    positions: (N, 3) float64; cell: (3, 3) rows = lattice vectors; senders/receivers: (E,);
    cell_offset: (E, 3) int. Returns shift (E, 3) = n @ cell, distance (E,), vector (E, 3).
    """
    shift = cell_offset.astype(np.float64) @ cell
    # pos[t] - pos[s] first, so that an atom's +n and -n self-images tie exactly.
    delta = (positions[receivers] - positions[senders]) - shift
    distance = np.sqrt(np.einsum("ij,ij->i", delta, delta))
    return shift, distance, delta / distance[:, None]


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add: a*b is exact in float64, one rounding to float32 at the end."""
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


def jmp_float32_distance(positions: np.ndarray, cell: np.ndarray, senders: np.ndarray,
                         receivers: np.ndarray, cell_offset: np.ndarray) -> np.ndarray:
    """(E,) float32 edge lengths rounded exactly as JMP's float32 torch code computes them.

    Used only as the nearest-k sort key: symmetry-equivalent neighbours (e.g. the +a1 / +a2 /
    -a2 self-images of a hexagonal cell) have float64 lengths that differ by rounding noise, and
    which of them survive a cap depends on JMP's float32 values and tie order. Emulates
    `pos[s] - pos[t] + n @ cell` (float32, plain multiply-adds) and `Tensor.norm`
    (fma(z, z, fma(y, y, x*x)), then sqrt).
    """
    pos32 = positions.astype(np.float32)
    cell32 = cell.astype(np.float32)
    n = cell_offset.astype(np.float32)
    offset = n[:, 0:1] * cell32[0] + n[:, 1:2] * cell32[1] + n[:, 2:3] * cell32[2]
    delta = (pos32[senders] - pos32[receivers]) + offset
    x, y, z = delta[:, 0], delta[:, 1], delta[:, 2]
    return np.sqrt(_fma32(z, z, _fma32(y, y, x * x)))


def radius_graph(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float):
    """All pairs with 1e-4 < d^2 <= cutoff^2, periodic images included along periodic axes.

    positions: (N, 3) float64; cell: (3, 3) (ignored when no axis is periodic); pbc: (3,) bool.
    Returns senders (E,), receivers (E,) int64 and cell_offset (E, 3) int64 sorted by
    (receiver, sender, offset), and overlaps: (K, 2) (source, target) pairs closer than
    sqrt(1e-4) Å other than an atom with itself (JMP silently drops them; callers reject them).
    """
    pbc = np.asarray(pbc, dtype=bool)
    box = cell if pbc.any() else np.zeros((3, 3))
    search = vesin.NeighborList(cutoff=cutoff * (1.0 + _SEARCH_MARGIN), full_list=True)
    # vesin pairs (i, j, S) mean pos[j] + S @ box - pos[i]: i is our target, j our source.
    first, second, shifts = search.compute(positions, box, pbc.tolist(), "ijS")
    senders = second.astype(np.int64)
    receivers = first.astype(np.int64)
    cell_offset = shifts.astype(np.int64)

    delta = (positions[receivers] - positions[senders]) - cell_offset.astype(np.float64) @ box
    distance_sq = np.einsum("ij,ij->i", delta, delta)
    itself = (senders == receivers) & ~cell_offset.any(axis=1)
    too_close = (distance_sq <= MIN_DISTANCE_SQ) & ~itself
    overlaps = np.stack([senders[too_close], receivers[too_close]], axis=1)
    keep = (distance_sq <= cutoff * cutoff) & (distance_sq > MIN_DISTANCE_SQ)

    senders, receivers, cell_offset = senders[keep], receivers[keep], cell_offset[keep]
    order = np.lexsort((cell_offset[:, 2], cell_offset[:, 1], cell_offset[:, 0], senders, receivers))
    return senders[order], receivers[order], cell_offset[order], overlaps


def neighbour_rank(receivers: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(E,) rank of each edge among its receiver's edges by distance; `rank < k` keeps the k nearest.

    receivers: (E,) sorted ascending; distance: (E,) sort key, e.g. `jmp_float32_distance`.
    Exact ties go to the earlier edge (stable sort). A sub-selection `rank < k` keeps edge order,
    and ranks stay valid inside any sub-selection made this way (nearest-k of nearest-K).
    """
    num_edges = receivers.shape[0]
    by_target_then_distance = np.lexsort((distance, receivers))
    segment_start = np.searchsorted(receivers, receivers[by_target_then_distance], side="left")
    rank = np.empty(num_edges, dtype=np.int64)
    rank[by_target_then_distance] = np.arange(num_edges) - segment_start
    return rank


def nearest_k(receivers: np.ndarray, distance: np.ndarray, k: int, num_nodes: int,
              tie_tolerance: float | None) -> np.ndarray:
    """(E,) bool: the edges a nearest-k cap per receiver keeps; edge order is unchanged.

    receivers: (E,) sorted ascending; distance: (E,) sort key in Å.
    tie_tolerance None: exactly the k nearest, exact ties to the earlier edge (the reference's
      strict cap; which tied edge survives then depends on atom order and image enumeration).
    tie_tolerance t >= 0: every edge within t of its receiver's k-th nearest distance, so tied
      neighbours (symmetric shells, an atom's +n / -n periodic images) are kept or dropped together
      and the graph does not depend on atom order, orientation or cell choice.
    """
    rank = neighbour_rank(receivers, distance)
    if tie_tolerance is None:
        return rank < k
    kth = np.full(num_nodes, np.inf)
    at_k = rank == k - 1
    kth[receivers[at_k]] = distance[at_k]
    return distance <= kth[receivers] + tie_tolerance
