"""Radius graphs vs brute force, the padded batch layout of `collate`, and budget packing."""
import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.constraints import FixAtoms

from jmp_jax.graph import radius, slots
from jmp_jax.graph.batching import (PADDING_SHIFT, BudgetOverflowError, Budgets, budgets_for, collate,
                                    pack_window, simulate_packing, structure_sizes)
from jmp_jax.graph.build import GraphSettings, build_from_atoms, build_structure_graphs
from reference_interactions import batch_interaction_lists, interaction_lists

SMALL = GraphSettings(cutoff=5.0, max_neighbors=12)


def _brute_force_pairs(positions, cell, pbc, cutoff):
    """{(s, t, n0, n1, n2): distance} for 1e-4 < d^2 <= cutoff^2, images along periodic axes."""
    reciprocal_norms = np.linalg.norm(np.linalg.inv(cell), axis=0) if any(pbc) else np.zeros(3)
    reps = [int(np.ceil(cutoff * reciprocal_norms[k])) + 1 if pbc[k] else 0 for k in range(3)]
    images = np.array(list(itertools.product(*[range(-r, r + 1) for r in reps])))
    pairs = {}
    for s, t in itertools.product(range(len(positions)), repeat=2):
        delta = positions[t] - positions[s] - images @ cell
        d2 = np.einsum("ij,ij->i", delta, delta)
        inside = (d2 > 1e-4) & (d2 <= cutoff**2)
        for n, d in zip(images[inside], np.sqrt(d2[inside])):
            pairs[(s, t, *n.tolist())] = d
    return pairs


def _edge_dict(edges):
    return {(s, t, *n): d for s, t, n, d in zip(edges.senders.tolist(), edges.receivers.tolist(),
                                                 edges.cell_offset.tolist(), edges.distance)}


SKEWED_CELL = np.array([[2.3, 0.0, 0.0], [1.9, 1.6, 0.0], [-0.8, 0.7, 2.1]])


@pytest.mark.parametrize("pbc", [(True, True, True), (True, False, True), (False, False, False)])
def test_radius_graph_matches_brute_force(pbc):
    rng = np.random.default_rng(7)
    positions = rng.random((3, 3)) @ SKEWED_CELL + 0.5 * rng.random((3, 3))
    settings = GraphSettings(cutoff=4.5 if any(pbc) else 3.0, max_neighbors=12)
    if not any(pbc):  # pack the three atoms within the cutoff of each other
        positions = positions * 0.8
    sg = build_structure_graphs([6, 8, 1], positions, SKEWED_CELL, pbc, None, settings)
    expected = _brute_force_pairs(positions, SKEWED_CELL, pbc, settings.cutoff)
    got = _edge_dict(sg.a2a)
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-12)
    # JMP order: by target, then source, then cell offset.
    order = np.lexsort((*sg.a2a.cell_offset.T[::-1], sg.a2a.senders, sg.a2a.receivers))
    np.testing.assert_array_equal(order, np.arange(sg.a2a.num_edges))
    for axis in np.flatnonzero(~np.asarray(pbc)):
        assert not sg.a2a.cell_offset[:, axis].any()
    # main before symmetrisation: the k nearest per target and every edge within the tie tolerance of the
    # k-th (the default caps; checked on distances).
    for t in range(3):
        by_distance = np.sort([d for k, d in expected.items() if k[1] == t])
        kth = by_distance[min(settings.caps().main, by_distance.size) - 1]
        nearest = by_distance[by_distance <= kth + settings.tie_tolerance]
        np.testing.assert_allclose(np.sort(sg.main_knn.distance[sg.main_knn.receivers == t]), nearest,
                                   atol=1e-6)
    # vector convention: from the source image to the target.
    a = sg.a2a
    np.testing.assert_allclose(a.vector * a.distance[:, None],
                               positions[a.receivers] - positions[a.senders] - a.cell_offset @ SKEWED_CELL)


def test_nearest_k_ties_keep_earliest_edge():
    receivers = np.array([0, 0, 0, 0, 1, 1])
    key = np.array([2.0, 1.0, 2.0, 2.0, 5.0, 5.0], dtype=np.float32)
    rank = radius.neighbour_rank(receivers, key)
    np.testing.assert_array_equal(rank, [1, 0, 2, 3, 0, 1])


def test_symmetrised_main_graph():
    sg = build_structure_graphs([11, 17], [[0, 0, 0], [1.4, 1.5, 1.3]], SKEWED_CELL * 1.3,
                                (True, True, True), None, SMALL)
    m = sg.main
    np.testing.assert_array_equal(m.senders[sg.id_swap], m.receivers)
    np.testing.assert_array_equal(m.cell_offset[sg.id_swap], -m.cell_offset)
    np.testing.assert_array_equal(sg.id_swap[sg.id_swap], np.arange(m.num_edges))
    half = m.num_edges // 2
    np.testing.assert_array_equal(m.senders[half:], m.receivers[:half])  # [kept, reversed kept]


def _edge_keys(edges) -> set:
    return set(zip(edges.senders.tolist(), edges.receivers.tolist(), map(tuple, edges.cell_offset.tolist())))


def test_main_graph_symmetrisation_policies():
    """Invariant: main = kNN edges and their reverses. Reference (JMP): a pair survives only if its kNN edge in
    canonical direction (s < t, or s == t with a negative offset) was chosen, so some one-sided pairs are lost."""
    positions = np.random.default_rng(2).random((6, 3)) * 3.0
    built = {policy: build_structure_graphs([6] * 6, positions, SKEWED_CELL * 1.6, (True,) * 3, None,
                                            GraphSettings(cutoff=4.0, max_neighbors=5, neighbor_policy=policy))
             for policy in ("invariant", "reference")}

    def reverse(key):
        s, t, off = key
        return t, s, tuple(-o for o in off)

    def canonical(key):
        s, t, off = key
        return s < t or (s == t and off < (0, 0, 0))

    knn = _edge_keys(built["invariant"].main_knn)
    assert _edge_keys(built["invariant"].main) == knn | {reverse(k) for k in knn}
    strict_knn = _edge_keys(built["reference"].main_knn)
    kept = {k for k in strict_knn if canonical(k)}
    assert _edge_keys(built["reference"].main) == kept | {reverse(k) for k in kept}
    assert len(built["reference"].main.senders) < len(built["invariant"].main.senders)
    for sg in built.values():
        np.testing.assert_array_equal(sg.main.senders[sg.id_swap], sg.main.receivers)


@pytest.fixture(scope="module")
def structures():
    water = build_from_atoms(molecule("H2O"), GraphSettings(cutoff=5.0, max_neighbors=12, pbc=(False,) * 3))
    salt = build_from_atoms(bulk("NaCl", "rocksalt", a=5.64), SMALL, name="NaCl")
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=6.0)
    slab.set_constraint(FixAtoms(indices=[0, 1]))
    slab.set_tags([0, 0, 0, 0, 1, 1, 1, 1])
    copper = build_from_atoms(slab, SMALL)  # partial PBC from the atoms (z not periodic)
    return [water, salt, copper]


def test_build_from_atoms_fields(structures):
    water, _, copper = structures
    np.testing.assert_array_equal(water.tags, [2, 2, 2])  # ase atoms without tags -> 2
    np.testing.assert_array_equal(copper.fixed, [True, True] + [False] * 6)
    np.testing.assert_array_equal(copper.tags, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(copper.pbc, [True, True, False])
    assert not copper.a2a.cell_offset[:, 2].any()
    # qint keeps only edges touching tags 1 or 2
    tagged = np.isin(copper.tags, [1, 2])
    touches = tagged[copper.qint.senders] | tagged[copper.qint.receivers]
    assert touches.all() and copper.qint.num_edges > 0


def _graph_of(batch):
    return np.repeat(np.arange(batch.num_graphs), batch.graph.n_node)


def _assert_edges_stay_in_graphs(edges_senders, edges_receivers, edge_mask, batch):
    node_mask = batch.graph.nodes["mask"]
    graph = _graph_of(batch)
    np.testing.assert_array_equal(node_mask[edges_senders], edge_mask)
    np.testing.assert_array_equal(node_mask[edges_receivers], edge_mask)
    np.testing.assert_array_equal(graph[edges_senders], graph[edges_receivers])


def _assert_triplets_valid(index, in_mask, out_mask, shared_in, shared_out):
    """Listed triplets join real edges of the batch that share the pivot atom; sorted by output edge."""
    assert in_mask[index.edge_in].all() and out_mask[index.edge_out].all()
    np.testing.assert_array_equal(shared_in[index.edge_in], shared_out[index.edge_out])
    assert np.all(np.diff(index.edge_out) >= 0)


def test_collate_layout(structures):
    budgets = budgets_for(structures, scale=1.2, multiple=16)
    batch = collate(structures, budgets)
    g = batch.graph
    assert batch.num_nodes == budgets.nodes and batch.num_graphs == len(structures) + 1
    assert g.n_node.sum() == budgets.nodes and g.n_edge.sum() == budgets.edges
    np.testing.assert_array_equal(g.globals["mask"], [True, True, True, False])
    total_nodes = sum(sg.num_atoms for sg in structures)
    np.testing.assert_array_equal(g.nodes["mask"], np.arange(budgets.nodes) < total_nodes)
    assert g.nodes["atomic_numbers"][~g.nodes["mask"]].sum() == 0
    assert g.senders.dtype == np.int32 and g.edges["shift"].dtype == np.float32

    # Per-structure blocks are the local indices plus offsets.
    second = structures[1]
    node_start = structures[0].num_atoms
    edge_start = structures[0].main.num_edges
    block = slice(edge_start, edge_start + second.main.num_edges)
    np.testing.assert_array_equal(g.senders[block], second.main.senders + node_start)
    np.testing.assert_array_equal(batch.id_swap[block], second.id_swap + edge_start)
    np.testing.assert_allclose(g.edges["shift"][block], second.main.shift, atol=1e-5)
    np.testing.assert_array_equal(g.n_edge[:3], [sg.main.num_edges for sg in structures])

    # Edges never cross graphs; padding edges join padding nodes and have length 1.
    edge_mask = g.edges["mask"]
    _assert_edges_stay_in_graphs(g.senders, g.receivers, edge_mask, batch)
    for edges in (batch.a2ee2a, batch.qint, batch.a2a):
        _assert_edges_stay_in_graphs(edges.senders, edges.receivers, edges.mask, batch)
        assert np.all(edges.shift[~edges.mask] == PADDING_SHIFT)
    pos = g.nodes["positions"]
    delta = pos[g.receivers] - pos[g.senders] - g.edges["shift"]
    assert np.all(np.linalg.norm(delta, axis=1) > 0.5)

    # id_swap maps real edges to their reverse and padding to padding.
    np.testing.assert_array_equal(batch.id_swap[batch.id_swap], np.arange(budgets.edges))
    np.testing.assert_array_equal(edge_mask[batch.id_swap], edge_mask)
    np.testing.assert_array_equal(g.senders[batch.id_swap][edge_mask], g.receivers[edge_mask])

    # Every edge set's slot grid holds exactly its real edges, each in a slot of its target atom.
    for name in slots.SLOTTED_GRAPHS:
        receivers, mask = slots.graph_edges(batch, name)
        layout = getattr(batch, f"{name}_slots")
        assert layout.edge.shape[0] == budgets.nodes and layout.edge.shape[1] % slots.SLOT_WIDTH_STEP == 0, name
        atom, _ = np.nonzero(layout.mask)
        np.testing.assert_array_equal(np.sort(layout.edge[layout.mask]), np.flatnonzero(mask))
        np.testing.assert_array_equal(receivers[layout.edge[layout.mask]], atom)


def test_batched_interaction_lists_use_the_batch_edges(structures):
    """`batch_interaction_lists` index the real edges of `collate`'s batch of the same structures."""
    batch = collate(structures, budgets_for(structures, scale=1.2, multiple=16))
    lists = batch_interaction_lists(structures)
    g, aeea, qint = batch.graph, batch.a2ee2a, batch.qint
    edge_mask, main_t = g.edges["mask"], g.receivers
    _assert_triplets_valid(lists.trip_e2e, edge_mask, edge_mask, main_t, main_t)
    _assert_triplets_valid(lists.trip_a2e, aeea.mask, edge_mask, aeea.receivers, main_t)
    _assert_triplets_valid(lists.trip_e2a, edge_mask, aeea.mask, main_t, aeea.receivers)
    q = lists.quad
    _assert_triplets_valid(q.triplet_in, edge_mask, qint.mask, main_t, qint.senders)
    _assert_triplets_valid(q.triplet_out, qint.mask, edge_mask, qint.receivers, main_t)
    np.testing.assert_array_equal(q.triplet_out.edge_out[q.trip_out_to_quad], q.edge_out)
    np.testing.assert_array_equal(q.triplet_in.edge_out[q.trip_in_to_quad],
                                  q.triplet_out.edge_in[q.trip_out_to_quad])
    per_structure = [interaction_lists(sg).quad.edge_out.shape[0] for sg in structures]
    assert q.edge_out.shape[0] == sum(per_structure) > 0


def test_budgets_for_rounds_and_reserves_padding(structures):
    needs = [structure_sizes(sg) for sg in structures]
    budgets = budgets_for(structures, multiple=32)
    for kind, limit in budgets.as_dict().items():
        total = sum(getattr(n, kind) for n in needs)
        if kind == "graphs":
            assert limit == total + 1
        else:
            assert limit % 32 == 0 and total + 1 <= limit < total + 33


@pytest.mark.parametrize("kind", ["a2a", "qint", "edges", "nodes", "graphs"])
def test_budget_overflow_raises(structures, kind):
    exact = budgets_for(structures)
    collate(structures, exact)  # need + 1 fits
    too_small = Budgets(**{**exact.as_dict(), kind: getattr(exact, kind) - 1})
    with pytest.raises(BudgetOverflowError, match=kind) as info:
        collate(structures, too_small)
    assert isinstance(info.value, ValueError)
    assert info.value.need == getattr(exact, kind) - 1 and info.value.limit == getattr(exact, kind) - 1
    assert "NaCl" in str(info.value)


def test_settings_caps():
    caps = GraphSettings(cutoff=7.0, max_neighbors=100).caps()
    assert (caps.main, caps.a2ee2a, caps.qint, caps.a2a) == (100, 66, 26, 3333)
    periodic = GraphSettings.pretrain_periodic()
    assert (periodic.cutoff, periodic.max_neighbors, periodic.pbc) == (12.0, 30, (True, True, True))
    assert GraphSettings.pretrain_molecule().pbc == (False, False, False)


def test_atoms_and_arrays_agree():
    atoms = Atoms("CO2", positions=[[0, 0, 0], [1.16, 0, 0], [-1.16, 0, 0]])
    a = build_from_atoms(atoms, GraphSettings.pretrain_molecule())
    b = build_structure_graphs([6, 8, 8], atoms.positions, np.eye(3) * 1000, (False,) * 3, [2, 2, 2],
                               GraphSettings.pretrain_molecule())
    np.testing.assert_array_equal(a.main.senders, b.main.senders)
    np.testing.assert_array_equal(a.qint.senders, b.qint.senders)
    assert not a.main.cell_offset.any()


def test_structure_without_quadruplets_collates(structures):
    """Tags all 0 (bulk only): empty qint graph, no quadruplets; the batch is still well formed."""
    bulk_only = build_structure_graphs([29, 29], [[0, 0, 0], [1.8, 1.8, 0]], np.diag([3.6, 3.6, 3.6]),
                                       (True, True, True), [0, 0], SMALL, name="bulk-only")
    assert bulk_only.qint.num_edges == 0 and interaction_lists(bulk_only).quad.edge_out.shape[0] == 0
    batch = collate([bulk_only, structures[0]], budgets_for([bulk_only, structures[0]]))
    water_qint = structures[0].qint.num_edges
    assert batch.qint.mask.sum() == batch.qint_slots.mask.sum() == water_qint > 0
    assert not batch.qint_slots.mask[:2].any()  # the Cu atoms have no qint edges
    assert batch.qint.senders[:water_qint].min() >= 2  # water's atoms follow Cu


def test_budget_arithmetic(structures):
    sizes = [structure_sizes(sg) for sg in structures]
    total = sum(sizes, Budgets.zeros())
    np.testing.assert_array_equal(total.as_array(), np.sum([s.as_array() for s in sizes], axis=0))
    assert Budgets.from_array(total.as_array()) == total
    exact = Budgets.from_array(total.as_array() + 1)
    assert total.fits_in(exact) and not total.fits_in(Budgets(**{**exact.as_dict(), "a2a": total.a2a}))
    with pytest.raises(BudgetOverflowError, match="'a2a'.*limit 3.*task x"):
        total.check_fits(Budgets(**{**exact.as_dict(), "a2a": 3}), what="task x")


def test_edge_dropout_drops_a2a_edges_then_subselects():
    atoms = molecule("C6H6")
    plain = build_from_atoms(atoms, SMALL)
    args = (atoms.get_atomic_numbers(), atoms.get_positions(), None, (False,) * 3, None, SMALL)
    dropped = build_structure_graphs(*args, edge_dropout=0.5, rng=np.random.default_rng(3))
    again = build_structure_graphs(*args, edge_dropout=0.5, rng=np.random.default_rng(3))
    assert 0.3 < dropped.a2a.num_edges / plain.a2a.num_edges < 0.7
    np.testing.assert_array_equal(dropped.a2a.senders, again.a2a.senders)  # deterministic given the rng
    kept = set(zip(dropped.a2a.senders.tolist(), dropped.a2a.receivers.tolist()))
    assert set(zip(dropped.main_knn.senders.tolist(), dropped.main_knn.receivers.tolist())) <= kept
    # main is the nearest-k of what survived: every target keeps min(k, surviving edges) edges.
    for t in range(len(atoms)):
        surviving = int((dropped.a2a.receivers == t).sum())
        assert int((dropped.main_knn.receivers == t).sum()) == min(SMALL.max_neighbors, surviving)


def _flat(n: int) -> Budgets:
    return Budgets.from_array(np.full(len(Budgets.zeros().as_array()), n))


def test_pack_window_picks_the_bucket_the_batch_fills_best():
    small, large = _flat(11), _flat(21)
    # The small bucket packs 4 + 3 + 2 (9 of 11 slots), the large one all 19 of 21: the large one fills better.
    needs = [_flat(n) for n in (4, 7, 3, 2, 3)]
    assert pack_window(needs, [small, large]) == (1, [0, 1, 2, 3, 4])
    # Only small structures: both buckets hold all of them, the small one fills better.
    assert pack_window([_flat(n) for n in (4, 3, 2)], [small, large]) == (0, [0, 1, 2])
    # The first in line is never passed over when choosing: 15 fits only the large bucket.
    assert pack_window([_flat(15), _flat(2)], [small, large]) == (1, [0, 1])
    # A step's fixed bucket is packed as it is, even passing over the first in line; none fits: no picks.
    assert pack_window([_flat(15), _flat(2)], [small, large], bucket=0) == (0, [1])
    assert pack_window([_flat(25)], [small, large]) == (1, [])


def test_simulated_packing_keeps_one_bucket_per_step():
    small, large = _flat(11), _flat(21)
    needs = [_flat(n) for n in (4, 3, 2, 15, 9, 8, 4, 3, 2, 2, 9, 15, 3)]
    for shards in (1, 2, 3):
        totals, chosen = simulate_packing(needs, [small, large], window=4, shards_per_step=shards)
        assert totals[:, 0].sum() == sum(n.nodes for n in needs)
        limits = np.array([small.nodes, large.nodes])[chosen]
        assert np.all(totals[:, 0] + 1 <= limits)
        steps = chosen[:len(chosen) // shards * shards].reshape(-1, shards)
        assert np.all(steps == steps[:, :1])
    assert set(chosen) == {0, 1}


def test_nearest_k_keeps_ties_with_the_kth_unless_strict():
    receivers = np.array([0, 0, 0, 0, 1, 1, 1])
    distance = np.array([2.0, 1.0, 2.005, 3.0, 5.0, 4.0, 6.0])
    # receiver 0: k = 2 ends at 2.0; 2.005 is within 0.01 of it. Receiver 1 has no tie.
    np.testing.assert_array_equal(radius.nearest_k(receivers, distance, 2, 2, 0.01),
                                  [True, True, True, False, True, True, False])
    np.testing.assert_array_equal(radius.nearest_k(receivers, distance, 2, 2, None),
                                  [True, True, False, False, True, True, False])
    # Fewer than k edges: all kept.
    np.testing.assert_array_equal(radius.nearest_k(receivers, distance, 5, 2, 0.01), [True] * 7)
