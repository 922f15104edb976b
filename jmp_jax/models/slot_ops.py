"""Moves between the edge list and the per-atom slot grid (`EdgeSlots`) with gathers both ways.

An edge occupies exactly one slot, so the two layouts are permutations of each other (plus empty
entries that read as zero). jax's derivative of a gather is a scatter-add, which XLA runs serially on
CPU; these custom VJPs use the inverse gather instead, and `swap_edges` uses that `id_swap` is its own
inverse. This keeps every data movement of the interaction blocks a parallel gather.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jmp_jax.graph.types import EdgeSlots


def take_rows(x: jax.Array, index: jax.Array, fill=0) -> jax.Array:
    """x[index] along axis 0, out-of-range indices reading `fill`: (R, ...) -> index.shape + (...)."""
    return jnp.asarray(x).at[index].get(mode="fill", fill_value=fill)


@jax.custom_vjp
def _edges_to_slots(x: jax.Array, edge: jax.Array, slot_of_edge: jax.Array) -> jax.Array:
    return take_rows(x, edge)


def _edges_to_slots_fwd(x, edge, slot_of_edge):
    return take_rows(x, edge), (edge, slot_of_edge)


def _edges_to_slots_bwd(res, ct):
    edge, slot_of_edge = res
    flat = ct.reshape((-1,) + ct.shape[2:])
    return take_rows(flat, slot_of_edge), None, None


_edges_to_slots.defvjp(_edges_to_slots_fwd, _edges_to_slots_bwd)


@jax.custom_vjp
def _slots_to_edges(xs: jax.Array, edge: jax.Array, slot_of_edge: jax.Array) -> jax.Array:
    return take_rows(xs.reshape((-1,) + xs.shape[2:]), slot_of_edge)


def _slots_to_edges_fwd(xs, edge, slot_of_edge):
    return _slots_to_edges(xs, edge, slot_of_edge), (edge, slot_of_edge)


def _slots_to_edges_bwd(res, ct):
    edge, slot_of_edge = res
    return take_rows(ct, edge), None, None


_slots_to_edges.defvjp(_slots_to_edges_fwd, _slots_to_edges_bwd)


def edges_to_slots(x: jax.Array, slots: EdgeSlots) -> jax.Array:
    """Per-edge (E, ...) -> per-slot (N, K, ...); empty slots are zero."""
    return _edges_to_slots(x, slots.edge, slots.slot_of_edge)


def slots_to_edges(xs: jax.Array, slots: EdgeSlots) -> jax.Array:
    """Per-slot (N, K, ...) -> per-edge (E, ...); padding edges are zero."""
    return _slots_to_edges(xs, slots.edge, slots.slot_of_edge)


def slot_sources(senders: jax.Array, slots: EdgeSlots) -> jax.Array:
    """(N, K) source atom of each slot's edge; N (no atom, reads zero in a fill gather) where empty."""
    return take_rows(senders, slots.edge, fill=slots.edge.shape[0])


def sum_into_atoms(x: jax.Array, slots: EdgeSlots) -> jax.Array:
    """sum over the edges into each atom: (E, ...) -> (N, ...), accumulated in at least float32."""
    acc = jnp.promote_types(x.dtype, jnp.float32)
    return jnp.sum(edges_to_slots(x, slots).astype(acc), axis=1).astype(x.dtype)


@jax.custom_vjp
def swap_edges(x: jax.Array, id_swap: jax.Array) -> jax.Array:
    """x[id_swap] (E, ...): each edge takes its reverse edge's row; id_swap must be an involution."""
    return x[id_swap]


def _swap_fwd(x, id_swap):
    return x[id_swap], id_swap


def _swap_bwd(id_swap, ct):
    return ct[id_swap], None


swap_edges.defvjp(_swap_fwd, _swap_bwd)
