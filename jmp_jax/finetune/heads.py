"""Fine-tuning output heads (docs/jmp_spec.md §1.7): new MLPs on the backbone's per-atom / per-edge features.

Every head reads padded arrays and returns one value per graph (or per atom for forces); padding
atoms never reach a real graph's value (explicit masks, static segment counts).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from ase.data import atomic_masses

from jmp_jax.graph.types import GraphBatch
from jmp_jax.models.jmp import HeadMLP

REDUCTIONS = ("sum", "mean", "max")
# The spatial-extent head stacks `output.num_mlps` = 5 hidden layers before its Linear(d, 1).
SPATIAL_EXTENT_HIDDEN = 5
ATOMIC_MASSES = np.asarray(atomic_masses, np.float32)  # index Z (ase; Z = 0 is a dummy entry)


def reduce_atoms(values: jax.Array, batch: GraphBatch, reduction: str) -> jax.Array:
    """Per-graph sum / mean / max of per-atom `values` (N,) or (N, C) over real atoms -> (G,) or (G, C)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r} is not one of {REDUCTIONS}")
    mask = batch.graph.nodes["mask"].reshape((-1,) + (1,) * (values.ndim - 1))
    segments, num = batch.node_graph_index, batch.num_graphs
    if reduction == "max":
        # Empty (padding) graphs would give -inf: they get 0 instead.
        top = jax.ops.segment_max(jnp.where(mask, values, -jnp.inf), segments, num_segments=num)
        return jnp.where(jnp.isfinite(top), top, 0.0)
    total = jax.ops.segment_sum(jnp.where(mask, values, 0.0), segments, num_segments=num)
    if reduction == "sum":
        return total
    count = jax.ops.segment_sum(mask.astype(values.dtype), segments, num_segments=num)
    return total / jnp.maximum(count, 1.0)


class ScalarHead(nn.Module):
    """JMP `GraphScalarOutputHead`: per-atom MLP (hidden bias), reduced per graph.  -> (G,)"""

    reduction: str = "sum"
    hidden_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, energy_features: jax.Array, batch: GraphBatch) -> jax.Array:
        x = HeadMLP(1, hidden_bias=self.hidden_bias, dtype=self.dtype, name="mlp")(energy_features)[:, 0]
        return reduce_atoms(x, batch, self.reduction)


class ClassificationHead(nn.Module):
    """JMP `GraphMulticlassClassificationOutputHead`: input dropout, MLP to C logits, reduced.  -> (G, C)"""

    num_classes: int
    dropout: float = 0.0
    reduction: str = "sum"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, energy_features: jax.Array, batch: GraphBatch, train: bool) -> jax.Array:
        x = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0.0)(energy_features)
        x = HeadMLP(self.num_classes, final_bias=True, dtype=self.dtype, name="mlp")(x)
        return reduce_atoms(x, batch, self.reduction)


class SpatialExtentHead(nn.Module):
    """JMP's QM9 R² head: bias-free MLP to x_i, then R² = Σ_i x_i |pos_i - COM|² (mass-weighted COM). -> (G,)"""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, energy_features: jax.Array, batch: GraphBatch) -> jax.Array:
        x = HeadMLP(1, num_hidden=SPATIAL_EXTENT_HIDDEN, hidden_bias=False, dtype=self.dtype,
                      name="mlp")(energy_features)[:, 0]
        nodes = batch.graph.nodes
        return reduce_atoms(x * squared_distance_to_center_of_mass(nodes["positions"], nodes["atomic_numbers"],
                                                                   batch), batch, "sum")


def squared_distance_to_center_of_mass(positions: jax.Array, atomic_numbers: jax.Array,
                                       batch: GraphBatch) -> jax.Array:
    """|pos_i - COM_{graph(i)}|² with the mass-weighted centre of each graph's real atoms.  -> (N,)"""
    mask = batch.graph.nodes["mask"]
    masses = jnp.where(mask, jnp.asarray(ATOMIC_MASSES)[atomic_numbers], 0.0)
    segments, num = batch.node_graph_index, batch.num_graphs
    weighted = jax.ops.segment_sum(masses[:, None] * positions, segments, num_segments=num)
    total = jax.ops.segment_sum(masses, segments, num_segments=num)
    center = weighted / jnp.maximum(total, 1e-12)[:, None]
    offset = positions - center[segments]
    return jnp.sum(offset * offset, axis=-1)


class DirectForceHead(nn.Module):
    """JMP `NodeVectorOutputHead`: F_t = Σ_{s->t} f(m_st) V_st over the main graph's real edges.  -> (N, 3)"""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, force_features: jax.Array, V_st: jax.Array, batch: GraphBatch) -> jax.Array:
        f = HeadMLP(1, dtype=self.dtype, name="mlp")(force_features)[:, 0]
        f = jnp.where(batch.graph.edges["mask"], f, 0.0)
        return jax.ops.segment_sum(f[:, None] * V_st.astype(f.dtype), batch.graph.receivers,
                                   num_segments=batch.num_nodes)
