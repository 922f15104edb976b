"""The mixed-task input pipeline: mixing proportions, determinism, exact resume, budgets and budget buckets."""
import concurrent.futures
import threading

import jax
import numpy as np
import pytest
from ase.build import molecule

from jmp_jax.data import budget_plan
from jmp_jax.data.pipeline import Pipeline, TaskSpec, merge_states, temperature_probabilities
from jmp_jax.data.process_exchange import ProcessExchange
from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, build_structure_graphs

SETTINGS = GraphSettings(cutoff=5.0, max_neighbors=12, pbc=(False, False, False))
NAMES = ("H2O", "NH3", "CH4", "C2H6", "CH3OH", "C2H4", "HCN", "CH3CH2OH")
# 3 to 14 atoms: neighbours per atom differ several-fold between the smallest and largest.
VARIED = ("H2O", "trans-butane", "NH3", "CH4", "C6H6", "HCN", "H2O", "isobutane", "CH4", "CH3COCH3", "NH3")


def _records(n: int, seed: int, names=NAMES) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = molecule(names[i % len(names)])
        atoms.rattle(0.05, seed=seed * 1000 + i)
        k = len(atoms)
        out.append(dict(atomic_numbers=atoms.numbers, positions=atoms.positions, cell=np.zeros((3, 3)),
                        pbc=np.zeros(3, bool), tags=np.full(k, 2), fixed=np.zeros(k, bool),
                        energy=float(rng.normal()), forces=rng.normal(size=(k, 3)), source_id=f"{seed}-{i}"))
    return out


def _budgets(records, structures: int) -> batching.Budgets:
    graphs = [build_structure_graphs(r["atomic_numbers"], r["positions"], r["cell"], None, r["tags"], SETTINGS)
              for r in records[:len(NAMES)]]
    sizes = np.array([batching.structure_sizes(g).as_array() for g in graphs])
    need = np.maximum(np.ceil(sizes.mean(0) * structures), sizes.max(0)).astype(int) + 1
    return batching.Budgets.from_array(need)


def _flat(n: int) -> batching.Budgets:
    return batching.Budgets.from_array(np.full(len(batching.Budgets.zeros().as_array()), n))


SOURCES = [_records(40, 1), _records(10, 2)]
TASKS = [TaskSpec("big", SETTINGS, _budgets(SOURCES[0], 3)), TaskSpec("small", SETTINGS, _budgets(SOURCES[1], 3))]


def _pipeline(**kw) -> Pipeline:
    args = dict(seed=7, temperature=2.0, num_batch_shards=2, num_workers=2)
    return Pipeline(TASKS, SOURCES, **{**args, **kw})


def _take(pipe: Pipeline, n: int) -> list:
    return [next(pipe) for _ in range(n)]


def _same(a, b):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1].energy, b[1].energy)
    np.testing.assert_array_equal(a[1].graphs.graph.nodes["positions"], b[1].graphs.graph.nodes["positions"])
    np.testing.assert_array_equal(a[1].graphs.a2a.senders, b[1].graphs.a2a.senders)
    np.testing.assert_array_equal(a[1].graphs.main_slots.edge, b[1].graphs.main_slots.edge)


def test_temperature_probabilities_formula_and_measured_mixing():
    p = temperature_probabilities([100, 8, 4, 10], 2.0)
    frac = np.array([100, 8, 4, 10]) / 122
    np.testing.assert_allclose(p, np.sqrt(frac) / np.sqrt(frac).sum())
    pipe = _pipeline()
    draws = np.array([pipe.task_of_step(s) for s in range(20_000)])
    expected = temperature_probabilities([40, 10], 2.0)
    np.testing.assert_allclose(np.bincount(draws) / len(draws), expected, atol=0.01)


def test_batches_are_deterministic_and_resume_exactly():
    first = _pipeline()
    head = _take(first, 3)
    state = first.state()
    tail = _take(first, 4)
    first.close()
    again = _pipeline()
    for a, b in zip(_take(again, 3), head):
        _same(a, b)
    again.close()
    resumed = _pipeline()
    resumed.restore(state)
    for a, b in zip(_take(resumed, 4), tail):
        _same(a, b)
    resumed.close()


def test_batches_are_padded_to_the_task_budgets_and_carry_labels():
    pipe = _pipeline(edge_dropout=0.1)
    for task, batch in _take(pipe, 4):
        (budgets,) = TASKS[task].buckets
        assert batch.graphs.graph.nodes["positions"].shape == (2, budgets.nodes, 3)
        assert batch.graphs.a2a.senders.shape == (2, budgets.a2a)
        real_graphs = batch.graphs.graph.globals["mask"].sum(axis=1)
        assert np.all(real_graphs >= 1)
        # Energies exist for real graphs only; forces for real nodes only.
        assert np.all(batch.energy[~batch.graphs.graph.globals["mask"]] == 0)
        assert np.all(batch.forces[~batch.graphs.graph.nodes["mask"]] == 0)
    pipe.close()


def test_records_are_split_across_lanes_and_processes_pack_parts_of_the_same_batches():
    seen = [{lane.streams[0].record_index(p) for p in range(20)} for lane in _pipeline().lanes]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40
    # Two processes with one lane each (their exchange stubbed by one store): together the batches of one.
    store = _SharedStore()
    parts = [_pipeline(lanes=[k], exchange=ProcessExchange("test", store, k, 2)) for k in range(2)]
    whole = _pipeline()
    for _ in range(3):  # the parts wait for each other's values: their own threads, as their own processes
        (task, batch), *others = [next(whole), *concurrent.futures.ThreadPoolExecutor(2).map(next, parts)]
        assert all(t == task for t, _ in others)
        for k, (_, part) in enumerate(others):
            np.testing.assert_array_equal(part.energy[0], batch.energy[k])
            np.testing.assert_array_equal(part.graphs.a2a.senders[0], batch.graphs.a2a.senders[k])
    merged = merge_states([p.state() for p in parts])
    assert merged == whole.state()
    for p in [whole, *parts]:
        p.close()


class _SharedStore:
    """The key-value calls `ProcessExchange` makes, on one dict (as the coordination service keeps them)."""

    def __init__(self):
        self.values, self.changed = {}, threading.Condition()

    def key_value_set(self, key, value):
        with self.changed:
            assert key not in self.values, key
            self.values[key] = value
            self.changed.notify_all()

    def blocking_key_value_get(self, key, timeout_ms):
        with self.changed:
            if not self.changed.wait_for(lambda: key in self.values, timeout_ms / 1000):
                raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: {key}")
            return self.values[key]

    def key_value_delete(self, key):
        with self.changed:
            self.values.pop(key, None)


@pytest.mark.parametrize("buckets", [2, (2, 3)])
def test_structure_that_never_fits_is_a_clear_error(buckets):
    tiny = tuple(_flat(n) for n in np.atleast_1d(buckets))
    pipe = Pipeline([TaskSpec("tiny", SETTINGS, tiny)], [SOURCES[0]], seed=0, temperature=1.0,
                    num_batch_shards=1)
    with pytest.raises(batching.BudgetOverflowError, match="tiny"):
        next(pipe)
    pipe.close()


def test_first_fit_keeps_order_and_simulated_packing_uses_every_structure():
    budgets = _flat(11)
    needs = [_flat(n) for n in (4, 7, 3, 2, 6)]
    assert batching.first_fit(needs, budgets) == [0, 2, 3]  # 4 + 3 + 2 <= 10; 7 and 6 no longer fit
    totals, chosen = batching.simulate_packing(needs, [budgets], window=3)
    assert totals[:, 0].sum() == 22 and np.all(totals <= 10) and np.all(chosen == 0)


def test_validation_structures_larger_than_any_training_one_fit_the_planned_shapes():
    """Budgets are planned on the training split; validation batches use the same shapes, so the validation
    split's most atoms-rich structures join the floor (`also_fit`)."""
    train = _records(8, 4, ("H2O", "NH3", "CH4"))  # at most 5 atoms
    val = _records(2, 5, ("trans-butane", "H2O"))  # 14 atoms
    without = budget_plan.plan_buckets(None, None, 2, seed=0, sample=budget_plan.sample_needs(train, SETTINGS, 0))
    with_val = budget_plan.plan_buckets(None, None, 2, seed=0,
                                        sample=budget_plan.sample_needs(train, SETTINGS, 0, also_fit=[val]))

    def first_batch(buckets):
        pipe = Pipeline([TaskSpec("val", SETTINGS, buckets)], [val], seed=0, temperature=1.0, num_batch_shards=1,
                        shuffle=False, task_probabilities=np.ones(1))
        try:
            return next(pipe)
        finally:
            pipe.close()

    with pytest.raises(batching.BudgetOverflowError):
        first_batch(without)
    _, batch = first_batch(with_val)
    assert int(batch.graphs.graph.globals["mask"].sum()) >= 1


VARIED_SOURCE = _records(90, 3, VARIED)
KINDS = ("nodes", "edges", "a2ee2a", "qint", "a2a")


@pytest.fixture(scope="module")
def plans():
    """One shape and the buckets planned for a set of widely varying molecules, 4 structures per batch."""
    single = budget_plan.plan_budgets(VARIED_SOURCE, SETTINGS, 4, seed=0)
    buckets = budget_plan.plan_buckets(VARIED_SOURCE, SETTINGS, 4, seed=0)
    return single, buckets


def _varied_pipeline(buckets, **kw) -> Pipeline:
    args = dict(seed=3, temperature=1.0, num_batch_shards=1, num_workers=2)
    return Pipeline([TaskSpec("varied", SETTINGS, buckets)], [VARIED_SOURCE], **{**args, **kw})


def _masks(batch) -> dict:
    g = batch.graphs
    return {"nodes": g.graph.nodes["mask"], "edges": g.graph.edges["mask"], "a2ee2a": g.a2ee2a.mask,
            "qint": g.qint.mask, "a2a": g.a2a.mask, "graphs": g.graph.globals["mask"]}


def _fill(buckets, steps: int = 30) -> np.ndarray:
    """(kinds,) mean real / padded entries over `steps` steps; checks every batch against its bucket."""
    pipe = _varied_pipeline(buckets)
    fills, shapes = [], set()
    for _, batch in _take(pipe, steps):
        masks = _masks(batch)
        sizes = {k: m.shape[1] for k, m in masks.items()}
        shapes.add(tuple(sizes.values()))
        assert any(all(getattr(b, k) == n for k, n in sizes.items()) for b in buckets)  # one of the task's shapes
        for k, m in masks.items():  # real entries fit, with a padding slot left, in every shard
            assert np.all(m.sum(axis=1) <= m.shape[1] - 1) and not m[:, -1].any()
        fills.append([masks[k].mean() for k in KINDS])
    pipe.close()
    assert len(shapes) <= len(buckets)
    return np.mean(fills, axis=0)


def test_buckets_fill_varied_sizes_better_with_at_most_two_shapes(plans):
    single, buckets = plans
    assert len(buckets) == 2 and buckets[0] != buckets[1]
    one, two = _fill((single,)), _fill(buckets)
    assert two.min() > one.min() + 0.02, (one, two)
    assert two.mean() > one.mean(), (one, two)


def test_bucketed_batches_are_deterministic_and_resume_exactly(plans):
    _, buckets = plans
    first = _varied_pipeline(buckets, edge_dropout=0.1)
    head = _take(first, 3)
    state = first.state()
    tail = _take(first, 5)
    first.close()
    assert len({tuple(m.shape for m in _masks(b).values()) for _, b in head + tail}) == 2  # both shapes come up
    again = _varied_pipeline(buckets, edge_dropout=0.1)
    for a, b in zip(_take(again, 3), head):
        _same(a, b)
    again.close()
    resumed = _varied_pipeline(buckets, edge_dropout=0.1)
    resumed.restore(state)
    for a, b in zip(_take(resumed, 5), tail):
        _same(a, b)
    resumed.close()
