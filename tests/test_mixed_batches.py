"""JMP's mixed-task batches: composition from the temperature mixture, per-structure labels, budgets planned
on the mixture, exact resume, and per-structure heads."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jmp_jax.data import budget_plan
from jmp_jax.data.pipeline import Pipeline, TaskSpec, temperature_probabilities
from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, build_structure_graphs
from jmp_jax.models.jmp import PretrainOutput
from test_pipeline import KINDS, NAMES, VARIED, _masks, _records, _same, _take

# Two tasks with different graph settings and structures, so that they need different budgets.
SETTINGS = (GraphSettings(cutoff=5.0, max_neighbors=12, pbc=(False,) * 3),
            GraphSettings(cutoff=3.0, max_neighbors=6, pbc=(False,) * 3))
SOURCES = [_records(60, 11, VARIED), _records(15, 12, NAMES)]
REFERENCES = [np.linspace(0.0, 1.0, 120), None]
SIZES = [len(s) for s in SOURCES]


@pytest.fixture(scope="module")
def mixture():
    """Both tasks with the buckets and slot widths planned on their temperature mixture, 4 per batch."""
    samples = [budget_plan.sample_needs(src, settings, seed=0) for src, settings in zip(SOURCES, SETTINGS)]
    sample = budget_plan.mixture_sample(samples, temperature_probabilities(SIZES, 2.0), seed=0)
    buckets = budget_plan.plan_buckets(None, None, 4, seed=0, sample=sample)
    tasks = [TaskSpec(name, settings, buckets, reference, sample.slot_widths)
             for name, settings, reference in zip(("varied", "small"), SETTINGS, REFERENCES)]
    return tasks, sample


def _pipeline(tasks, **kw) -> Pipeline:
    args = dict(seed=5, temperature=2.0, num_batch_shards=2, num_workers=2,
                task_mixing="batch")
    return Pipeline(tasks, SOURCES, **{**args, **kw})


def test_draws_follow_the_temperature_mixture_and_batches_mix_tasks(mixture):
    tasks, _ = mixture
    pipe = _pipeline(tasks)
    expected = temperature_probabilities(SIZES, 2.0)
    draws = np.array([pipe.task_of_draw(k) for k in range(20_000)])
    np.testing.assert_allclose(np.bincount(draws) / len(draws), expected, atol=0.01)
    counts, mixed_batches = np.zeros(2), 0
    for task, batch in _take(pipe, 40):
        assert task is None
        real = batch.graphs.graph.globals["mask"]
        assert np.all(batch.task[~real] == 0)
        counts += np.bincount(batch.task[real], minlength=2)
        mixed_batches += sum(len(set(row[m])) > 1 for row, m in zip(batch.task, real))
    pipe.close()
    # Every drawn structure is eventually taken: the batches' composition is the mixture's.
    np.testing.assert_allclose(counts / counts.sum(), expected, atol=0.05)
    assert mixed_batches > 40  # of 80 batches of ~4 structures, most hold both tasks


def test_each_structure_carries_its_own_tasks_labels(mixture):
    tasks, _ = mixture
    pipe = _pipeline(tasks)
    for _ in range(5):
        _, batch = next(pipe)
        for shard in range(2):
            real = batch.graphs.graph.globals["mask"][shard]
            numbers = batch.graphs.graph.nodes["atomic_numbers"][shard]
            start = 0
            for g in np.flatnonzero(real):
                n = int(batch.graphs.graph.n_node[shard][g])
                task = int(batch.task[shard][g])
                record = next(r for r in SOURCES[task] if np.array_equal(r["atomic_numbers"], numbers[start:start + n])
                              and np.allclose(r["forces"], batch.forces[shard][start:start + n]))
                reference = REFERENCES[task]
                label = record["energy"] - (reference[record["atomic_numbers"]].sum() if reference is not None else 0)
                assert batch.energy[shard][g] == pytest.approx(label, rel=1e-6, abs=1e-6)
                start += n
    pipe.close()


def test_mixture_budgets_hold_every_batch_in_at_most_two_shapes_and_fill_them(mixture):
    tasks, sample = mixture
    assert 1 <= len(tasks[0].buckets) <= 2
    assert budget_plan.replay_fill(sample, tasks[0].buckets)[:-1].min() >= 0.85
    pipe = _pipeline(tasks, num_batch_shards=1, edge_dropout=0.1)
    shapes, fills = set(), []
    for _, batch in _take(pipe, 40):
        masks = _masks(batch)
        shapes.add(tuple(m.shape[1] for m in masks.values()))
        for m in masks.values():  # real entries fit, with a padding slot left
            assert np.all(m.sum(axis=1) <= m.shape[1] - 1) and not m[:, -1].any()
        fills.append([masks[k].mean() for k in KINDS])
    pipe.close()
    assert shapes <= {tuple(b.as_array()) for b in tasks[0].buckets}
    assert np.mean(fills) >= 0.85, np.mean(fills, axis=0)


def test_mixed_tasks_need_shared_budgets(mixture):
    tasks, _ = mixture
    other = TaskSpec("small", SETTINGS[1], tasks[0].buckets[0], None)
    with pytest.raises(ValueError, match="share buckets"):
        _pipeline([tasks[0], other])


def test_mixed_batches_are_deterministic_and_resume_exactly(mixture):
    tasks, _ = mixture
    first = _pipeline(tasks, edge_dropout=0.1)
    head = _take(first, 3)
    state = first.state()
    tail = _take(first, 5)
    first.close()
    assert state["lanes"]["0"]["deferred"]  # the window left structures in line: resuming must restore them
    again = _pipeline(tasks, edge_dropout=0.1)
    for a, b in zip(_take(again, 3), head):
        _same(a, b)
    again.close()
    resumed = _pipeline(tasks, edge_dropout=0.1)
    resumed.restore(state)
    for a, b in zip(_take(resumed, 5), tail):
        _same(a, b)
        np.testing.assert_array_equal(a[1].task, b[1].task)
    resumed.close()


def test_per_structure_heads_match_each_tasks_own_head():
    """A (G,) task array gives every structure's atoms and edges the heads of its own task."""
    records = SOURCES[1][:3]
    batch = batching.collate([build_structure_graphs(r["atomic_numbers"], r["positions"], r["cell"], None,
                                                     r["tags"], SETTINGS[0]) for r in records],
                             batching.Budgets(nodes=40, edges=400, a2ee2a=400, qint=400, a2a=400, graphs=4))
    rng = np.random.default_rng(0)
    energy_features = jnp.asarray(rng.normal(size=(batch.num_nodes, 8)), jnp.float32)
    force_features = jnp.asarray(rng.normal(size=(batch.graph.senders.shape[0], 8)), jnp.float32)
    V_st = jnp.asarray(rng.normal(size=(batch.graph.senders.shape[0], 3)), jnp.float32)
    heads = PretrainOutput(num_tasks=3)
    params = heads.init(jax.random.key(0), energy_features, force_features, V_st, batch, 0)
    per_task = [heads.apply(params, energy_features, force_features, V_st, batch, t) for t in range(3)]
    graph_task = jnp.array([2, 0, 1, 0])  # the last graph is padding
    energy, forces = heads.apply(params, energy_features, force_features, V_st, batch, graph_task)
    node_graph = np.asarray(batch.node_graph_index)
    for g, t in enumerate(np.asarray(graph_task)):
        np.testing.assert_allclose(energy[g], per_task[t][0][g], rtol=1e-6)
        np.testing.assert_allclose(forces[node_graph == g], per_task[t][1][node_graph == g], rtol=1e-6)
