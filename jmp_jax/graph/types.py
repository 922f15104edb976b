"""The padded, static-shape graph batch the model consumes.

Every array has a static length set by a budget. Padding follows jraph's convention: padding nodes
belong to padding graphs and padding edges join padding nodes, so every padded entry lands in a
padding segment and never touches a real one. The masks say which entries are real. All indices are
global (offset per structure) int32. There are no triplet or quadruplet lists: the model enumerates
them densely over each atom's edge slots (`EdgeSlots`).

Geometry is not stored: distances and unit vectors are computed inside the model from
`positions` and `shift` so that `jax.grad` w.r.t. positions gives forces.
For an edge s -> t:  D_st = pos[t] - (pos[s] + shift),  d_st = |D_st|,  V_st = D_st / d_st
(V_st points from the source image to the target, as JMP's `vector`).
"""
from __future__ import annotations

import flax.struct
import jax
import jraph


@flax.struct.dataclass
class EdgeSet:
    """One directed graph s -> t over the batch's atoms."""

    senders: jax.Array     # (E,) int32, source atom s
    receivers: jax.Array   # (E,) int32, target atom t
    shift: jax.Array       # (E, 3) float, cell_offset @ cell in Å
    mask: jax.Array        # (E,) bool


@flax.struct.dataclass
class EdgeSlots:
    """The edges into every atom laid out densely: slot (a, k) holds the k-th edge into atom a.

    The model runs triplet, quadruplet and pair interactions as dense contractions over these slots
    (every triplet c->a <- b is a pair of slots of atom a), so no triplet or quadruplet list and no
    scatter over them is needed. Missing entries hold an out-of-range index (E for `edge`, N*K for
    `slot_of_edge`), which gathers with mode="fill" read as zero.
    """

    edge: jax.Array          # (N, K) int32 edge index of each slot, E where empty
    mask: jax.Array          # (N, K) bool, slot holds a real edge
    slot_of_edge: jax.Array  # (E,) int32 flat slot a*K + k of each edge, N*K for padding edges


@flax.struct.dataclass
class GraphBatch:
    """Everything GemNet-OC needs for one padded batch.

    graph: jraph.GraphsTuple of the symmetrised main graph.
      nodes:   {"atomic_numbers": (N,) int32 (0 on padding), "positions": (N, 3) float,
                "tags": (N,) int32, "fixed": (N,) bool, "mask": (N,) bool}
      edges:   {"shift": (E, 3) float, "mask": (E,) bool}
      senders / receivers: (E,) int32 (s, t)
      n_node / n_edge: (G,) int32, globals: {"mask": (G,) bool}
    id_swap: (E,) index of the reverse edge of each main edge.
    <name>_slots: the per-atom slot layout of each edge set (main = graph).
    """

    graph: jraph.GraphsTuple
    id_swap: jax.Array
    a2ee2a: EdgeSet
    qint: EdgeSet
    a2a: EdgeSet
    main_slots: EdgeSlots
    a2ee2a_slots: EdgeSlots
    qint_slots: EdgeSlots
    a2a_slots: EdgeSlots

    @property
    def num_nodes(self) -> int:
        return self.graph.nodes["positions"].shape[0]

    @property
    def num_graphs(self) -> int:
        return self.graph.n_node.shape[0]

    @property
    def node_graph_index(self) -> jax.Array:
        """(N,) graph index of every node (static length)."""
        return jax.numpy.repeat(jax.numpy.arange(self.num_graphs), self.graph.n_node,
                                total_repeat_length=self.num_nodes)
