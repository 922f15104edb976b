"""The mixed-task input pipeline: mixing proportions, determinism, exact resume, budgets."""
import numpy as np
import pytest
from ase.build import molecule

from jmp_jax.data.pipeline import Pipeline, TaskSpec, temperature_probabilities
from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, build_structure_graphs

SETTINGS = GraphSettings(cutoff=5.0, max_neighbors=12, pbc=(False, False, False))
NAMES = ("H2O", "NH3", "CH4", "C2H6", "CH3OH", "C2H4", "HCN", "CH3CH2OH")


def _records(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = molecule(NAMES[i % len(NAMES)])
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


SOURCES = [_records(40, 1), _records(10, 2)]
TASKS = [TaskSpec("big", SETTINGS, _budgets(SOURCES[0], 3)), TaskSpec("small", SETTINGS, _budgets(SOURCES[1], 3))]


def _pipeline(**kw) -> Pipeline:
    args = dict(seed=7, temperature=2.0, num_batch_shards=2, num_workers=2, process_index=0, process_count=1)
    return Pipeline(TASKS, SOURCES, **{**args, **kw})


def _take(pipe: Pipeline, n: int) -> list:
    return [next(pipe) for _ in range(n)]


def _same(a, b):
    assert a[0] == b[0]
    np.testing.assert_array_equal(a[1].energy, b[1].energy)
    np.testing.assert_array_equal(a[1].graphs.graph.nodes["positions"], b[1].graphs.graph.nodes["positions"])
    np.testing.assert_array_equal(a[1].graphs.quad.edge_out, b[1].graphs.quad.edge_out)


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
        budgets = TASKS[task].budgets
        assert batch.graphs.graph.nodes["positions"].shape == (2, budgets.nodes, 3)
        assert batch.graphs.quad.edge_out.shape == (2, budgets.quads)
        real_graphs = batch.graphs.graph.globals["mask"].sum(axis=1)
        assert np.all(real_graphs >= 1)
        # Energies exist for real graphs only; forces for real nodes only.
        assert np.all(batch.energy[~batch.graphs.graph.globals["mask"]] == 0)
        assert np.all(batch.forces[~batch.graphs.graph.nodes["mask"]] == 0)
    pipe.close()


def test_records_are_split_across_processes():
    seen = []
    for index in range(2):
        pipe = _pipeline(process_index=index, process_count=2)
        seen.append({pipe.streams[0].record_index(p) for p in range(pipe.streams[0].per_epoch)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 40


def test_structure_that_never_fits_is_a_clear_error():
    tiny = batching.Budgets.from_array(np.full(12, 2))
    pipe = Pipeline([TaskSpec("tiny", SETTINGS, tiny)], [SOURCES[0]], seed=0, temperature=1.0,
                    num_batch_shards=1, process_index=0, process_count=1)
    with pytest.raises(batching.BudgetOverflowError, match="tiny"):
        next(pipe)
    pipe.close()


def test_first_fit_keeps_order_and_simulated_packing_uses_every_structure():
    budgets = batching.Budgets.from_array(np.full(12, 11))
    needs = [batching.Budgets.from_array(np.full(12, n)) for n in (4, 7, 3, 2, 6)]
    assert batching.first_fit(needs, budgets) == [0, 2, 3]  # 4 + 3 + 2 <= 10; 7 and 6 no longer fit
    totals = batching.simulate_packing(needs, budgets, window=3)
    assert totals[:, 0].sum() == 22 and np.all(totals <= 10)
