"""JMP pre-training loss and metrics for one padded batch (docs/jmp_spec.md §3.3).

Everything is computed in normalised units (target / std, mean 0) and reduced over real entries only.
A single-task batch uses its task's scales; a mixed-task batch gives every structure its own task's
scales (`structure_normalization`).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from jmp_jax.data.types import TaskNormalization

# torch's F.pairwise_distance adds this to the difference before the norm; JMP's force loss uses it.
PAIRWISE_DISTANCE_EPS = 1e-6


def structure_normalization(norms: Sequence[TaskNormalization], graph_task: jax.Array) -> TaskNormalization:
    """Each structure's own task's scales: every field becomes a (G,) array.  graph_task: (G,) task index."""
    table = jnp.asarray([dataclasses.astuple(n) for n in norms], jnp.float32)  # (T, 4)
    return TaskNormalization(*table[graph_task].T)


def per_graph(value, num_graphs: int) -> jax.Array:
    """A task scale (scalar, or (G,) per structure) as a (G,) float32 array."""
    return jnp.broadcast_to(jnp.asarray(value, jnp.float32), (num_graphs,))


def segment_mean(values: jax.Array, segment_ids: jax.Array, mask: jax.Array, num_segments: int) -> jax.Array:
    """Mean of `values` (N,) over the masked entries of each segment; 0 for empty segments.  -> (G,)"""
    total = jax.ops.segment_sum(jnp.where(mask, values, 0.0), segment_ids, num_segments)
    count = jax.ops.segment_sum(mask.astype(values.dtype), segment_ids, num_segments)
    return total / jnp.maximum(count, 1.0)


def structure_loss_terms(pred_energy: jax.Array, pred_forces: jax.Array, energy: jax.Array, forces: jax.Array,
                         node_graph: jax.Array, node_mask: jax.Array,
                         norm: TaskNormalization) -> tuple[jax.Array, jax.Array]:
    """Per structure b: |E_b - y_b| / σE_b * c_E,b  and  mean_{i in b} ||(F_i - f_i) / σF_b||_2 * c_F,b.  -> (G,), (G,)

    pred_energy, energy: (G,) eV;  pred_forces, forces: (N, 3) eV/Å;  node_graph: (N,) graph of each node;
    node_mask: (N,) real nodes;  norm: scalars (one task) or (G,) arrays (`structure_normalization`).
    """
    num_graphs = pred_energy.shape[0]
    energy_std, force_std, energy_coefficient, force_coefficient = (
        per_graph(getattr(norm, f.name), num_graphs) for f in dataclasses.fields(norm))
    energy_term = jnp.abs(pred_energy - energy) / energy_std * energy_coefficient
    diff = (pred_forces - forces) / force_std[node_graph, None] + PAIRWISE_DISTANCE_EPS
    force_err = jnp.sqrt(jnp.sum(diff * diff, axis=-1)) * force_coefficient[node_graph]
    return energy_term, segment_mean(force_err, node_graph, node_mask, num_graphs)


def energy_force_loss(pred_energy: jax.Array, pred_forces: jax.Array, energy: jax.Array, forces: jax.Array,
                      node_graph: jax.Array, node_mask: jax.Array, graph_mask: jax.Array,
                      norm: TaskNormalization) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = mean_b |E_b - y_b| / σE * c_E  +  mean_b mean_{i in b} ||(F_i - f_i) / σF||_2 * c_F  (structure-wise),
    the mean over the batch's real structures, each with its own task's scales when `norm` holds (G,) arrays.

    Shapes as `structure_loss_terms`;  graph_mask: (G,) real graphs.  Returns the scalar loss and its parts.
    """
    real_graphs = jnp.maximum(graph_mask.sum(), 1)
    energy_term, force_term = structure_loss_terms(pred_energy, pred_forces, energy, forces, node_graph,
                                                   node_mask, norm)
    loss_energy = jnp.where(graph_mask, energy_term, 0.0).sum() / real_graphs
    loss_forces = jnp.where(graph_mask, force_term, 0.0).sum() / real_graphs
    return loss_energy + loss_forces, {"loss_energy": loss_energy, "loss_forces": loss_forces}


def energy_force_errors(pred_energy: jax.Array, pred_forces: jax.Array, energy: jax.Array, forces: jax.Array,
                        node_mask: jax.Array, free_mask: jax.Array, graph_mask: jax.Array) -> dict[str, jax.Array]:
    """Sums of absolute errors in physical units, for MAEs that stay exact across batches and devices.

    Force errors count free (not fixed) real atoms only, as JMP's metrics do.
    """
    atom_mask = node_mask & free_mask
    return {
        "energy_abs_sum": jnp.where(graph_mask, jnp.abs(pred_energy - energy), 0.0).sum(),
        "energy_count": graph_mask.sum().astype(jnp.float32),
        "forces_abs_sum": jnp.where(atom_mask[:, None], jnp.abs(pred_forces - forces), 0.0).sum(),
        "forces_count": 3.0 * atom_mask.sum().astype(jnp.float32),
    }


def errors_by_task(pred_energy: jax.Array, pred_forces: jax.Array, energy: jax.Array, forces: jax.Array,
                   node_graph: jax.Array, node_mask: jax.Array, free_mask: jax.Array, graph_mask: jax.Array,
                   graph_task: jax.Array, num_tasks: int) -> dict[str, jax.Array]:
    """`energy_force_errors` of each task's structures in a mixed-task batch: every value is (T,)."""
    node_task = graph_task[node_graph]
    per_task = [energy_force_errors(pred_energy, pred_forces, energy, forces, node_mask & (node_task == t),
                                    free_mask, graph_mask & (graph_task == t)) for t in range(num_tasks)]
    return {k: jnp.stack([errors[k] for errors in per_task]) for k in per_task[0]}
