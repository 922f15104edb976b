import jax.numpy as jnp
import numpy as np
import pytest

from jmp_jax.data.types import TaskNormalization
from jmp_jax.training import loss as loss_lib


def test_structure_wise_force_loss_and_energy_l1():
    norm = TaskNormalization(energy_std=2.0, force_std=0.5, energy_coefficient=1.0, force_coefficient=10.0)
    # Two real structures (2 and 1 atoms) and one padding graph/node.
    pred_e = jnp.array([1.0, 4.0, 99.0])
    true_e = jnp.array([0.0, 2.0, 0.0])
    pred_f = jnp.array([[0.5, 0, 0], [0, 0, 0], [0, 1.0, 0], [7.0, 7, 7]])
    true_f = jnp.zeros((4, 3))
    node_graph = jnp.array([0, 0, 1, 2])
    node_mask = jnp.array([True, True, True, False])
    graph_mask = jnp.array([True, True, False])
    total, parts = loss_lib.energy_force_loss(pred_e, pred_f, true_e, true_f, node_graph, node_mask, graph_mask, norm)
    expected_e = (1.0 / 2.0 + 2.0 / 2.0) / 2
    eps = loss_lib.PAIRWISE_DISTANCE_EPS
    per_atom = lambda v: 10.0 * np.linalg.norm(np.asarray(v) / 0.5 + eps)  # noqa: E731
    expected_f = ((per_atom([0.5, 0, 0]) + per_atom([0, 0, 0])) / 2 + per_atom([0, 1.0, 0])) / 2
    assert float(parts["loss_energy"]) == pytest.approx(expected_e)
    assert float(parts["loss_forces"]) == pytest.approx(expected_f, rel=1e-5)
    assert float(total) == pytest.approx(expected_e + expected_f, rel=1e-5)


def test_error_sums_count_free_real_atoms_only():
    errors = loss_lib.energy_force_errors(
        jnp.array([1.0, 5.0]), jnp.ones((3, 3)), jnp.zeros(2), jnp.zeros((3, 3)),
        node_mask=jnp.array([True, True, False]), free_mask=jnp.array([True, False, True]),
        graph_mask=jnp.array([True, False]))
    assert float(errors["energy_abs_sum"]) == 1.0 and float(errors["energy_count"]) == 1.0
    assert float(errors["forces_abs_sum"]) == 3.0 and float(errors["forces_count"]) == 3.0


def test_mixed_batch_gives_every_structure_its_tasks_scales():
    """JMP's loss on a mixed-task batch (docs/jmp_spec.md §3.3): each structure normalised and weighted by its own task,
    then the mean over the batch's structures."""
    norms = (TaskNormalization(energy_std=2.0, force_std=0.5, energy_coefficient=1.0, force_coefficient=10.0),
             TaskNormalization(energy_std=4.0, force_std=0.25, energy_coefficient=3.0, force_coefficient=2.0))
    # Structures of tasks 1, 0, 1 (2, 1 and 1 atoms), then one padding graph and node.
    graph_task = jnp.array([1, 0, 1, 0])
    pred_e = jnp.array([1.0, 4.0, -2.0, 99.0])
    true_e = jnp.array([0.0, 2.0, 2.0, 0.0])
    pred_f = jnp.array([[0.5, 0, 0], [0, 0, 0], [0, 1.0, 0], [0, 0, 2.0], [7.0, 7, 7]])
    true_f = jnp.zeros((5, 3))
    node_graph = jnp.array([0, 0, 1, 2, 3])
    node_mask = jnp.array([True, True, True, True, False])
    graph_mask = jnp.array([True, True, True, False])
    scales = loss_lib.structure_normalization(norms, graph_task)
    total, parts = loss_lib.energy_force_loss(pred_e, pred_f, true_e, true_f, node_graph, node_mask, graph_mask,
                                              scales)
    eps = loss_lib.PAIRWISE_DISTANCE_EPS
    per_atom = lambda v, n: n.force_coefficient * np.linalg.norm(np.asarray(v) / n.force_std + eps)  # noqa: E731
    a, b = norms
    expected_e = (3.0 * 1.0 / 4.0 + 1.0 * 2.0 / 2.0 + 3.0 * 4.0 / 4.0) / 3
    expected_f = ((per_atom([0.5, 0, 0], b) + per_atom([0, 0, 0], b)) / 2 + per_atom([0, 1.0, 0], a)
                  + per_atom([0, 0, 2.0], b)) / 3
    assert float(parts["loss_energy"]) == pytest.approx(expected_e, rel=1e-6)
    assert float(parts["loss_forces"]) == pytest.approx(expected_f, rel=1e-5)
    assert float(total) == pytest.approx(expected_e + expected_f, rel=1e-5)

    errors = loss_lib.errors_by_task(pred_e, pred_f, true_e, true_f, node_graph, node_mask,
                                     free_mask=jnp.ones(5, bool), graph_mask=graph_mask, graph_task=graph_task,
                                     num_tasks=2)
    np.testing.assert_allclose(errors["energy_abs_sum"], [2.0, 5.0])
    np.testing.assert_allclose(errors["energy_count"], [1.0, 2.0])
    np.testing.assert_allclose(errors["forces_abs_sum"], [1.0, 2.5])
    np.testing.assert_allclose(errors["forces_count"], [3.0, 9.0])
