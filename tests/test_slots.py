"""The per-atom slot layout: the dense triplet/quadruplet masks enumerate exactly the host index lists
(`batch_interaction_lists`, JMP's lists, see test_graph_parity.py), and the slot gathers (with
their gather-only derivatives) are exact permutations."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import bulk, fcc111, molecule

from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, build_from_atoms
from jmp_jax.graph.slots import edge_slots
from jmp_jax.models import slot_ops
from jmp_jax.models.bases import edge_geometry, quadruplet_geometry, slot_geometry, triplet_sph
from reference_interactions import batch_interaction_lists


def _structures():
    tiny = bulk("Cu", "fcc", a=3.6)              # one atom: every neighbour is a periodic image of itself
    tiny.rattle(0.05, seed=1)
    slab = fcc111("Pt", size=(2, 2, 3), vacuum=6.0)
    slab.set_tags(np.where(slab.get_tags() == 1, 1, 0))
    slab.rattle(0.05, seed=2)
    mol = molecule("CH3CH2OH")
    mol.rattle(0.02, seed=3)
    periodic = GraphSettings(cutoff=6.0, max_neighbors=30)
    return [build_from_atoms(tiny, periodic), build_from_atoms(slab, periodic),
            build_from_atoms(mol, GraphSettings(cutoff=6.0, max_neighbors=30, pbc=(False,) * 3))]


@pytest.fixture(scope="module")
def graphs():
    return _structures()


@pytest.fixture(scope="module")
def batch(graphs):
    return batching.collate(graphs, batching.budgets_for(graphs))


@pytest.fixture(scope="module")
def lists(graphs):
    """The triplet / quadruplet lists, with the batch's edge indices."""
    return batch_interaction_lists(graphs)


# Jitted: run op by op, each basis function would compile its own small programs (the tests took several times longer).
_triplet_sph = jax.jit(triplet_sph, static_argnums=(2, 3))
_quadruplet_geometry = jax.jit(quadruplet_geometry, static_argnums=(3,))


def _geometry(batch, name):
    pos = jnp.asarray(batch.graph.nodes["positions"])
    if name == "main":
        s, r, shift, slots = batch.graph.senders, batch.graph.receivers, batch.graph.edges["shift"], batch.main_slots
    else:
        e = getattr(batch, name)
        s, r, shift, slots = e.senders, e.receivers, e.shift, getattr(batch, f"{name}_slots")
    return jax.jit(lambda *args: slot_geometry(edge_geometry(*args)[1], args[1], args[3], slots))(
        pos, jnp.asarray(s), jnp.asarray(r), jnp.asarray(shift))


def _pairs(sph, out_edge, in_edge):
    """{(out edge, in edge)} of the nonzero entries of a (N, K_out, K_in, S) basis (Y_0 is never 0)."""
    a, j, k = np.nonzero(np.asarray(sph[..., 0]))
    return set(zip(np.asarray(out_edge)[a, j].tolist(), np.asarray(in_edge)[a, k].tolist()))


def _listed(trip):
    return set(zip(trip.edge_out.tolist(), trip.edge_in.tolist()))


def test_dense_triplets_are_exactly_the_listed_ones(batch, lists):
    main, aeea = _geometry(batch, "main"), _geometry(batch, "a2ee2a")
    e2e = _pairs(_triplet_sph(main, main, 7, True), batch.main_slots.edge, batch.main_slots.edge)
    a2e = _triplet_sph(main, aeea, 7, False)
    assert e2e == _listed(lists.trip_e2e)
    assert _pairs(a2e, batch.main_slots.edge, batch.a2ee2a_slots.edge) == _listed(lists.trip_a2e)
    assert (_pairs(jnp.swapaxes(a2e, 1, 2), batch.a2ee2a_slots.edge, batch.main_slots.edge)
            == _listed(lists.trip_e2a))
    assert len(e2e) > 100


def test_dense_quadruplets_are_exactly_the_listed_ones(batch, lists):
    main, qint = _geometry(batch, "main"), batch.qint
    qint_unit = edge_geometry(jnp.asarray(batch.graph.nodes["positions"]), qint.senders, qint.receivers, qint.shift)[1]
    _, _, sph_dihedral = _quadruplet_geometry(main, qint, qint_unit, 7)
    q, j, k = np.nonzero(np.asarray(sph_dihedral[:, :, 0]))
    a, b = np.asarray(qint.receivers)[q], np.asarray(qint.senders)[q]
    dense = set(zip(np.asarray(batch.main_slots.edge)[a, j].tolist(), q.tolist(),
                    np.asarray(batch.main_slots.edge)[b, k].tolist()))
    quad = lists.quad
    listed = set(zip(quad.edge_out.tolist(), quad.triplet_out.edge_in[quad.trip_out_to_quad].tolist(),
                     quad.triplet_in.edge_in[quad.trip_in_to_quad].tolist()))
    assert len(listed) == quad.edge_out.shape[0]  # no quadruplet is listed twice
    assert dense == listed and len(listed) > 1000


def test_slot_gathers_are_permutations_with_exact_derivatives():
    receivers = np.array([2, 0, 2, 1, 2, 0, 0])
    mask = np.array([True, True, True, True, True, False, False])
    slots = edge_slots(receivers, mask, num_nodes=4, width=3)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)
    dense = slot_ops.edges_to_slots(x, slots)
    np.testing.assert_array_equal(dense[2, :3], x[np.array([0, 2, 4])])
    assert not np.any(dense[3]) and not np.any(dense[1, 1:])
    back = slot_ops.slots_to_edges(dense, slots)
    np.testing.assert_array_equal(back, jnp.where(jnp.asarray(mask)[:, None], x, 0.0))
    np.testing.assert_array_equal(slot_ops.sum_into_atoms(x, slots),
                                  jax.ops.segment_sum(jnp.where(jnp.asarray(mask)[:, None], x, 0.0), receivers, 4))

    # The custom derivatives equal those of the plain (scatter-based) gathers.
    w = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3, 5)), jnp.float32)
    plain_to_slots = lambda y: jnp.asarray(y).at[slots.edge].get(mode="fill", fill_value=0)  # noqa: E731
    g_custom = jax.grad(lambda y: jnp.sum(slot_ops.edges_to_slots(y, slots) * w))(x)
    np.testing.assert_allclose(g_custom, jax.grad(lambda y: jnp.sum(plain_to_slots(y) * w))(x))
    v = jnp.asarray(np.random.default_rng(2).normal(size=(7, 5)), jnp.float32)
    plain_to_edges = lambda d: d.reshape(-1, 5).at[slots.slot_of_edge].get(mode="fill", fill_value=0)  # noqa: E731
    np.testing.assert_allclose(jax.grad(lambda d: jnp.sum(slot_ops.slots_to_edges(d, slots) * v))(w),
                               jax.grad(lambda d: jnp.sum(plain_to_edges(d) * v))(w))
    swap = jnp.array([1, 0, 3, 2, 4, 5, 6])
    np.testing.assert_allclose(jax.grad(lambda y: jnp.sum(slot_ops.swap_edges(y, swap) * v))(x),
                               jax.grad(lambda y: jnp.sum(y[swap] * v))(x))


def test_slot_overflow_names_the_graph_and_atom():
    with pytest.raises(ValueError, match="main graph: atom 2 has 3 incoming edges, more than the 2 slots"):
        edge_slots(np.array([2, 2, 2, 0]), np.ones(4, bool), num_nodes=3, width=2, name="main graph")
