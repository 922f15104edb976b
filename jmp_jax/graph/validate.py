"""Input checks for graph construction: every error names the structure it is about."""
from __future__ import annotations

import numpy as np

MAX_ATOMIC_NUMBER = 120  # the atom embedding table has rows for Z = 1..120
_MIN_CELL_VOLUME = 1e-6  # Å^3; below this the lattice is treated as degenerate
# Limits that keep the native neighbour search (vesin) alive: it dies with SIGFPE once a non-periodic
# structure spans ~1e5 cutoffs (a coordinate of 1e6 Å at a 6 Å cutoff) and runs out of memory on cells so
# small that one atom has ~1e7 images within the cutoff. Real structures stay orders of magnitude below.
MAX_ABS_COORDINATE = 1e4  # Å, positions and lattice vectors
MAX_SPAN_IN_CUTOFFS = 1e4
MAX_NEIGHBOUR_PAIRS = 2e7  # estimated by `estimated_pairs`


class GraphInputError(ValueError):
    """A structure cannot be turned into a graph (bad atoms, positions or cell, overlapping atoms)."""

    def __init__(self, name: str | None, problem: str):
        self.structure = name
        super().__init__(f"structure {name!r}: {problem}" if name is not None else problem)


def estimated_pairs(num_atoms: int, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> float:
    """Neighbour pairs within `cutoff` of a periodic structure, roughly: N times the larger of the atoms
    of uniform density N / V in the cutoff sphere and the lattice images of an atom itself in the box of
    half-width cutoff (Π_i (1 + 2 r / h_i) over periodic axes, h_i the cell's height; this one dominates
    for thin cells). cell (3, 3) rows = lattice vectors, non-degenerate."""
    volume = abs(np.linalg.det(cell))
    heights = volume / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
    images = np.prod(np.where(pbc, 1.0 + 2.0 * cutoff / heights, 1.0))
    return num_atoms * max(num_atoms * 4.0 / 3.0 * np.pi * cutoff ** 3 / volume, images)


def _check_search_size(name, positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> None:
    """Refuse what the neighbour search cannot survive (see MAX_ABS_COORDINATE and the limits beside it)."""
    if not (np.isfinite(cutoff) and cutoff > 0):
        raise GraphInputError(name, f"cutoff must be a positive finite distance, got {cutoff}")
    far = np.abs(positions).max(axis=1)
    if far.max() > MAX_ABS_COORDINATE:
        atom = int(np.argmax(far))
        raise GraphInputError(name, f"atom {atom} has a coordinate of {far[atom]:.3g} Å "
                                    f"(|coordinate| must be <= {MAX_ABS_COORDINATE:g} Å)")
    offset = np.abs(positions - positions.min(axis=0))
    if offset.max() > MAX_SPAN_IN_CUTOFFS * cutoff:
        atom = int(np.argmax(offset.max(axis=1)))
        raise GraphInputError(name, f"atom {atom} lies {offset.max():.3g} Å from the others along an axis, more "
                                    f"than {MAX_SPAN_IN_CUTOFFS:g} cutoffs of {cutoff} Å")
    if not pbc.any():
        return
    if np.abs(cell).max() > MAX_ABS_COORDINATE:
        raise GraphInputError(name, f"cell has a lattice vector component of {np.abs(cell).max():.3g} Å "
                                    f"(must be <= {MAX_ABS_COORDINATE:g} Å)")
    pairs = estimated_pairs(positions.shape[0], cell, pbc, cutoff)
    if pairs > MAX_NEIGHBOUR_PAIRS:
        raise GraphInputError(name, f"cell too small for the {cutoff} Å cutoff: about {pairs:.2g} neighbour pairs "
                                    f"(volume {abs(np.linalg.det(cell)):.3g} Å^3, {positions.shape[0]} atoms; "
                                    f"limit {MAX_NEIGHBOUR_PAIRS:.0g})")


def check_structure(name, atomic_numbers, positions, cell, pbc, tags, fixed, *, cutoff: float):
    """Validate and normalise one structure's arrays for a neighbour search within `cutoff` Å.

    Returns atomic_numbers (N,) int64, positions (N, 3) float64, cell (3, 3) float64, pbc (3,) bool,
    tags (N,) int64, fixed (N,) bool. Raises GraphInputError naming `name`.
    """
    atomic_numbers = np.asarray(atomic_numbers)
    positions = np.asarray(positions, dtype=np.float64)
    if atomic_numbers.ndim != 1:
        raise GraphInputError(name, f"atomic_numbers must be 1-D, got shape {atomic_numbers.shape}")
    num_atoms = atomic_numbers.shape[0]
    if num_atoms == 0:
        raise GraphInputError(name, "empty structure (no atoms)")
    if not np.issubdtype(atomic_numbers.dtype, np.integer):
        if not np.all(np.isfinite(atomic_numbers)) or np.any(atomic_numbers != np.round(atomic_numbers)):
            raise GraphInputError(name, "atomic_numbers must be integers")
    atomic_numbers = atomic_numbers.astype(np.int64)
    unknown = np.flatnonzero((atomic_numbers < 1) | (atomic_numbers > MAX_ATOMIC_NUMBER))
    if unknown.size:
        raise GraphInputError(
            name, f"unknown element Z={atomic_numbers[unknown[0]]} at atom {unknown[0]} "
                  f"(valid: 1..{MAX_ATOMIC_NUMBER})")
    if positions.shape != (num_atoms, 3):
        raise GraphInputError(name, f"positions must have shape ({num_atoms}, 3), got {positions.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(positions), axis=1))
    if bad.size:
        raise GraphInputError(name, f"non-finite position (NaN/inf) at atom {bad[0]}")

    pbc = np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)).copy()
    cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64)
    if cell.shape != (3, 3):
        raise GraphInputError(name, f"cell must have shape (3, 3), got {cell.shape}")
    if not np.all(np.isfinite(cell)):
        raise GraphInputError(name, "cell contains NaN/inf")
    if pbc.any() and abs(np.linalg.det(cell)) < _MIN_CELL_VOLUME:
        raise GraphInputError(
            name, f"invalid cell for periodic boundaries {pbc.tolist()}: the lattice vectors are "
                  f"degenerate (volume {np.linalg.det(cell):.3g} Å^3)")
    _check_search_size(name, positions, cell, pbc, cutoff)

    tags = np.full(num_atoms, 2, np.int64) if tags is None else np.asarray(tags).astype(np.int64)
    fixed = np.zeros(num_atoms, bool) if fixed is None else np.asarray(fixed, dtype=bool)
    for key, value in (("tags", tags), ("fixed", fixed)):
        if value.shape != (num_atoms,):
            raise GraphInputError(name, f"{key} must have shape ({num_atoms},), got {value.shape}")
    return atomic_numbers, positions, cell, pbc, tags, fixed


def check_neighbours(name, overlaps: np.ndarray) -> None:
    """Reject overlapping atoms (d <= 0.01 Å). An atom with no neighbour within the cutoff is fine: as in
    JMP, it has no edges and keeps its embedding (an isolated adsorbate, a dissociated fragment)."""
    if overlaps.shape[0]:
        first, second = sorted(overlaps[0].tolist())
        what = f"atom {first} overlaps its own periodic image" if first == second \
            else f"atoms {first} and {second} overlap"
        raise GraphInputError(name, f"{what} (distance <= 0.01 Å)")
