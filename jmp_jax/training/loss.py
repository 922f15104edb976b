"""JMP pre-training loss and metrics for one single-task padded batch (spec §3.3).

Everything is computed in normalised units (target / std, mean 0) and reduced over real entries only.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# torch's F.pairwise_distance adds this to the difference before the norm; JMP's force loss uses it.
PAIRWISE_DISTANCE_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class TaskNormalization:
    """Per-task scales: targets are divided by the std; the loss terms are multiplied by the coefficients."""

    energy_std: float
    force_std: float
    energy_coefficient: float = 1.0
    force_coefficient: float = 1.0


def segment_mean(values: jax.Array, segment_ids: jax.Array, mask: jax.Array, num_segments: int) -> jax.Array:
    """Mean of `values` (N,) over the masked entries of each segment; 0 for empty segments.  -> (G,)"""
    total = jax.ops.segment_sum(jnp.where(mask, values, 0.0), segment_ids, num_segments)
    count = jax.ops.segment_sum(mask.astype(values.dtype), segment_ids, num_segments)
    return total / jnp.maximum(count, 1.0)


def energy_force_loss(pred_energy: jax.Array, pred_forces: jax.Array, energy: jax.Array, forces: jax.Array,
                      node_graph: jax.Array, node_mask: jax.Array, graph_mask: jax.Array,
                      norm: TaskNormalization) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L = mean_b |E_b - y_b| * c_E  +  mean_b mean_{i in b} ||F_i - f_i||_2 * c_F  (structure-wise).

    pred_energy, energy: (G,) eV;  pred_forces, forces: (N, 3) eV/Å;  node_graph: (N,) graph of each node;
    node_mask: (N,) real nodes;  graph_mask: (G,) real graphs.  Returns the scalar loss and its parts.
    """
    num_graphs = graph_mask.shape[0]
    real_graphs = jnp.maximum(graph_mask.sum(), 1)
    energy_err = jnp.abs(pred_energy - energy) / norm.energy_std
    loss_energy = jnp.where(graph_mask, energy_err, 0.0).sum() / real_graphs * norm.energy_coefficient

    diff = (pred_forces - forces) / norm.force_std + PAIRWISE_DISTANCE_EPS
    force_err = jnp.sqrt(jnp.sum(diff * diff, axis=-1)) * norm.force_coefficient
    per_structure = segment_mean(force_err, node_graph, node_mask, num_graphs)
    loss_forces = jnp.where(graph_mask, per_structure, 0.0).sum() / real_graphs
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
