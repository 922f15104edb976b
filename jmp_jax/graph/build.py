"""Per-structure GemNet-OC graphs as JMP builds them (host side, numpy, local atom indices).

Procedure (jmp_spec.md §2.1): one radius graph (a2a, capped at its own max-neighbours), then
main / a2ee2a / qint as nearest-k-per-target sub-selections of it, qint tag-filtered, main
symmetrised with its reverse-edge index. Triplet and quadruplet lists are not built here: the model
enumerates them densely over edge slots; `indices.interaction_lists` builds them on demand.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from ase.constraints import FixAtoms

from jmp_jax.graph import indices, radius
from jmp_jax.graph.validate import GraphInputError, check_neighbours, check_structure

# Neighbours within this many Å of a cap's k-th nearest are kept with it (`GraphSettings.neighbor_policy`).
# Exact ties (symmetric shells, an atom's +n / -n images) are what made graphs depend on atom order and
# frame; distinct distances are ranked the same whatever the order, so the tolerance only has to exceed
# numerical noise: float32-stored coordinates of ~100 Å move distances by ~1e-5 Å. Kept this small, it
# changes no graph of the reference fixtures that has no exact tie.
TIE_TOLERANCE = 1e-4
NEIGHBOR_POLICIES = ("invariant", "reference")


@dataclasses.dataclass(frozen=True)
class MaxNeighbors:
    """Per-graph neighbour caps (JMP `MaxNeighbors`)."""

    main: int
    a2ee2a: int
    qint: int
    a2a: int


@dataclasses.dataclass(frozen=True)
class GraphSettings:
    """How to build the graphs of one structure.

    cutoff: one radius for all four graphs (JMP always uses `Cutoffs.from_constant`).
    max_neighbors: main-graph cap N; the others follow `from_goc_base_proportions(N)`.
    pbc: None -> use the structure's own flags; a 3-tuple overrides them (pre-training uses full
      3-D PBC for OC20/OC22 and none for molecules).
    neighbor_policy: how caps and symmetrisation treat ties and one-sided neighbours.
      "invariant" (default): each nearest-k cap keeps every neighbour within TIE_TOLERANCE of the k-th
        (whole symmetric shells, an atom's +n and -n images together), and main is the union of its kNN
        graph and that graph's reverse. The graphs, hence energies, do not depend on atom order,
        orientation or cell choice; a cap can keep more than k edges.
      "reference": JMP's graphs edge for edge, for parity tests: strict caps of exactly k ranked by its
        float32 lengths, exact ties to the earlier edge (JMP's unstable sort may pick another), and its
        symmetrisation, which keeps a pair only if the kNN edge into the higher-index atom was chosen.
    """

    cutoff: float
    max_neighbors: int
    qint_tags: tuple[int, ...] = (1, 2)
    pbc: tuple[bool, bool, bool] | None = None
    neighbor_policy: str = "invariant"

    @classmethod
    def pretrain_periodic(cls) -> "GraphSettings":
        """OC20 / OC22 pre-training: 12 Å, N = 30, full 3-D PBC."""
        return cls(cutoff=12.0, max_neighbors=30, pbc=(True, True, True))

    @classmethod
    def pretrain_molecule(cls) -> "GraphSettings":
        """ANI-1x / Transition-1x pre-training: 8 Å, N = 30, no PBC."""
        return cls(cutoff=8.0, max_neighbors=30, pbc=(False, False, False))

    def __post_init__(self):
        if not self.cutoff > 0 or self.max_neighbors < 1:
            raise ValueError(f"GraphSettings needs cutoff > 0 and max_neighbors >= 1, got {self}")
        if self.pbc is not None and len(self.pbc) != 3:
            raise ValueError(f"GraphSettings.pbc must be None or 3 flags, got {self.pbc}")
        if self.neighbor_policy not in NEIGHBOR_POLICIES:
            raise ValueError(f"GraphSettings.neighbor_policy must be one of {NEIGHBOR_POLICIES}, got {self}")

    @property
    def tie_tolerance(self) -> float | None:
        """What `radius.nearest_k` keeps beyond the k-th neighbour: TIE_TOLERANCE, or None (strict)."""
        return TIE_TOLERANCE if self.neighbor_policy == "invariant" else None

    def caps(self) -> MaxNeighbors:
        """The four caps (JMP `MaxNeighbors.from_goc_base_proportions`)."""
        n = self.max_neighbors
        return MaxNeighbors(main=n, a2ee2a=int(n * 20 / 30), qint=int(n * 8 / 30),
                            a2a=int(n * 1000 / 30))


@dataclasses.dataclass(frozen=True)
class EdgeArrays:
    """A directed graph s -> t; geometry: D = pos[t] - pos[s] - shift, vector = D / distance."""

    senders: np.ndarray      # (E,) int64
    receivers: np.ndarray    # (E,) int64
    cell_offset: np.ndarray  # (E, 3) int64, image offset n of the sender
    shift: np.ndarray        # (E, 3) float64, n @ cell
    distance: np.ndarray     # (E,) float64
    vector: np.ndarray       # (E, 3) float64 unit vector from the source image to the target

    @property
    def num_edges(self) -> int:
        return self.senders.shape[0]

    @property
    def topology(self):
        """(senders, receivers, cell_offset), the form `indices` works on."""
        return self.senders, self.receivers, self.cell_offset

    def select(self, mask_or_index: np.ndarray) -> "EdgeArrays":
        """The sub-graph of the given edges (bool mask or index array), in that order."""
        return EdgeArrays(*(getattr(self, f.name)[mask_or_index] for f in dataclasses.fields(self)))


@dataclasses.dataclass(frozen=True)
class StructureGraphs:
    """The four graphs of one structure and the main graph's reverse-edge index (local indices;
    `collate` offsets them)."""

    name: str | None
    atomic_numbers: np.ndarray  # (N,) int64
    positions: np.ndarray       # (N, 3) float64
    cell: np.ndarray            # (3, 3) float64
    pbc: np.ndarray             # (3,) bool
    tags: np.ndarray            # (N,) int64
    fixed: np.ndarray           # (N,) bool
    a2a: EdgeArrays
    a2ee2a: EdgeArrays
    qint: EdgeArrays
    main_knn: EdgeArrays        # main graph before symmetrisation (what JMP's dataset stores)
    main: EdgeArrays            # symmetrised main graph
    id_swap: np.ndarray         # (E_main,) index of each main edge's reverse

    @property
    def num_atoms(self) -> int:
        return self.atomic_numbers.shape[0]


def edges_from_topology(positions: np.ndarray, cell: np.ndarray, senders: np.ndarray,
                        receivers: np.ndarray, cell_offset: np.ndarray) -> EdgeArrays:
    """EdgeArrays with float64 geometry for given edges (cell_offset (E, 3), cast to int64)."""
    senders, receivers = np.asarray(senders, np.int64), np.asarray(receivers, np.int64)
    cell_offset = np.rint(np.asarray(cell_offset)).astype(np.int64).reshape(-1, 3)
    shift, distance, vector = radius.edge_geometry(positions, cell, senders, receivers, cell_offset)
    return EdgeArrays(senders, receivers, cell_offset, shift, distance, vector)


def build_structure_graphs(atomic_numbers, positions, cell, pbc, tags, settings: GraphSettings,
                           *, fixed=None, name: str | None = None, edge_dropout: float = 0.0,
                           rng: np.random.Generator | None = None) -> StructureGraphs:
    """Build the four GemNet-OC graphs of one structure (main symmetrised, with its id_swap).

    atomic_numbers (N,), positions (N, 3) Å, cell (3, 3) rows = lattice vectors (may be None
    without PBC), pbc (3,) bool or None (then settings.pbc), tags (N,) or None (all 2),
    fixed (N,) or None (all False). Raises GraphInputError (a ValueError) naming `name`.
    edge_dropout: JMP's pre-training edge dropout, the probability of dropping each capped a2a edge
    (independently, drawn from `rng`) before main / a2ee2a / qint are sub-selected.

    Neighbour caps and symmetrisation follow `settings.neighbor_policy`: the reference's strict caps rank
    edges by JMP's float32 edge length (`radius.jmp_float32_distance`), the invariant ones by float64 length.
    """
    if pbc is None:
        if settings.pbc is None:
            raise GraphInputError(name, "pbc not given and settings.pbc is None")
        pbc = settings.pbc
    atomic_numbers, positions, cell, pbc, tags, fixed = check_structure(
        name, atomic_numbers, positions, cell, pbc, tags, fixed, cutoff=settings.cutoff)
    caps, tolerance, num_atoms = settings.caps(), settings.tie_tolerance, atomic_numbers.shape[0]

    senders, receivers, cell_offset, overlaps = radius.radius_graph(
        positions, cell, pbc, settings.cutoff)
    check_neighbours(name, overlaps)
    within_cutoff = edges_from_topology(positions, cell, senders, receivers, cell_offset)
    if tolerance is None:
        sort_key = radius.jmp_float32_distance(positions, cell, senders, receivers, cell_offset)
    else:
        sort_key = within_cutoff.distance
    capped = radius.nearest_k(receivers, sort_key, caps.a2a, num_atoms, tolerance)
    a2a, a2a_key = within_cutoff.select(capped), sort_key[capped]
    if edge_dropout > 0.0:
        if rng is None:
            raise ValueError("build_structure_graphs: edge_dropout needs an rng")
        kept = rng.random(a2a.num_edges) >= edge_dropout
        a2a, a2a_key = a2a.select(kept), a2a_key[kept]

    def nearest(k: int) -> EdgeArrays:
        """JMP's sub-selection of the k nearest a2a edges per target."""
        return a2a.select(radius.nearest_k(a2a.receivers, a2a_key, k, num_atoms, tolerance))

    qint_knn = nearest(caps.qint)
    quad_tags = np.asarray(settings.qint_tags, dtype=np.int64)
    touches_tag = np.isin(tags[qint_knn.senders], quad_tags) | np.isin(tags[qint_knn.receivers], quad_tags)
    return assemble_structure_graphs(
        name=name, atomic_numbers=atomic_numbers, positions=positions, cell=cell, pbc=pbc,
        tags=tags, fixed=fixed, a2a=a2a, main_knn=nearest(caps.main), a2ee2a=nearest(caps.a2ee2a),
        qint=qint_knn.select(touches_tag), union=settings.neighbor_policy == "invariant")


def assemble_structure_graphs(*, name, atomic_numbers, positions, cell, pbc, tags, fixed,
                              a2a: EdgeArrays, main_knn: EdgeArrays, a2ee2a: EdgeArrays,
                              qint: EdgeArrays, union: bool = False) -> StructureGraphs:
    """Symmetrise main (and index its reverse edges) given the four base graphs.

    Inputs are already validated numpy arrays (see `build_structure_graphs`); the edge sets are
    receiver-sorted, e.g. JMP's own per-structure graphs loaded with `edges_from_topology`.
    union: symmetrise as the union of main_knn and its reverse, else JMP's way (`indices.symmetrize`).
    """
    num_atoms = atomic_numbers.shape[0]
    sym_s, sym_t, sym_off = indices.symmetrize(*main_knn.topology, union=union)
    return StructureGraphs(
        name=name, atomic_numbers=atomic_numbers, positions=positions, cell=cell, pbc=pbc,
        tags=tags, fixed=fixed, a2a=a2a, a2ee2a=a2ee2a, qint=qint, main_knn=main_knn,
        main=edges_from_topology(positions, cell, sym_s, sym_t, sym_off),
        id_swap=indices.reverse_edge_index(sym_s, sym_t, sym_off, num_atoms))


def build_from_atoms(atoms, settings: GraphSettings, tags=None, *, name: str | None = None
                     ) -> StructureGraphs:
    """`build_structure_graphs` for an ase.Atoms.

    pbc: settings.pbc if set, else atoms.pbc. tags: the argument, else the atoms' own tags array
    if it has one, else all 2 (JMP's convention for every non-catalysis dataset).
    fixed: atoms held by an ase FixAtoms constraint.
    """
    if tags is None and atoms.has("tags"):
        tags = atoms.get_tags()
    fixed = np.zeros(len(atoms), dtype=bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
    pbc = settings.pbc if settings.pbc is not None else atoms.pbc
    return build_structure_graphs(
        atoms.get_atomic_numbers(), atoms.get_positions(), np.asarray(atoms.cell[:]), pbc, tags,
        settings, fixed=fixed, name=name if name is not None else atoms.get_chemical_formula())
