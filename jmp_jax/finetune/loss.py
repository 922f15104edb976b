"""Fine-tuning losses and metrics (docs/jmp_spec.md §4.1): normalised-unit losses, denormalised metric sums.

  scalar:          L = c * mean_graphs |ŷ - (y - mean) / std|                         (L1)
  classification:  L = Σ_graphs w[y] * CE(logits, y)                                  (reduction "sum")
  forces:          L = c * mean_atoms ||F̂ - F / std_F||_2,  c = 100 by default        (not structure-wise)
Metrics are returned as sums and counts (`*_sum` / `*_count`: exact over any number of batches and shards);
`summarize` turns them into MAEs / balanced accuracy.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.finetune.model import HeadSpec
from jmp_jax.training.loss import PAIRWISE_DISTANCE_EPS
from jmp_jax.data.types import LabeledBatch

# (metric name, mode) the run selects checkpoints and schedules on, per head kind.
PRIMARY_METRIC = {"scalar": ("mae", "min"), "forces": ("force_mae", "min"),
                  "classification": ("balanced_accuracy", "max")}


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Target statistics and loss weights of one task (mean 0 / std 1 = no normalisation)."""

    target_mean: float = 0.0
    target_std: float = 1.0
    force_std: float = 1.0
    coefficient: float = 1.0               # scalar L1 coefficient, or the force coefficient (JMP: 100)
    class_weights: tuple[float, ...] | None = None


def task_loss(out: dict[str, jax.Array], batch: LabeledBatch, spec: HeadSpec,
              norm: Normalization) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metric sums) of one padded batch; `out` is `finetune.model.predict`'s output."""
    graph_mask = batch.graphs.graph.globals["mask"]
    real_graphs = jnp.maximum(graph_mask.sum(), 1).astype(jnp.float32)
    if spec.kind == "scalar":
        y = batch.targets
        pred = out["scalar"].astype(jnp.float32)
        err = jnp.abs(pred - (y - norm.target_mean) / norm.target_std)
        loss = norm.coefficient * jnp.where(graph_mask, err, 0.0).sum() / real_graphs
        physical = pred * norm.target_std + norm.target_mean
        return loss, {"abs_sum": jnp.where(graph_mask, jnp.abs(physical - y), 0.0).sum(),
                      "target_count": graph_mask.sum().astype(jnp.float32)}
    if spec.kind == "classification":
        return _classification_loss(out["logits"].astype(jnp.float32), batch.targets, graph_mask, spec, norm)
    node_mask = batch.graphs.graph.nodes["mask"]
    pred = out["forces"].astype(jnp.float32)
    diff = pred - batch.forces / norm.force_std + PAIRWISE_DISTANCE_EPS
    per_atom = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    real_atoms = jnp.maximum(node_mask.sum(), 1).astype(jnp.float32)
    loss = norm.coefficient * jnp.where(node_mask, per_atom, 0.0).sum() / real_atoms
    abs_err = jnp.abs(pred * norm.force_std - batch.forces)
    return loss, {"force_abs_sum": jnp.where(node_mask[:, None], abs_err, 0.0).sum(),
                  "force_count": 3.0 * node_mask.sum().astype(jnp.float32)}


def _classification_loss(logits, targets, graph_mask, spec: HeadSpec, norm: Normalization):
    """Weighted cross-entropy summed over graphs, and per-class (correct, total) counts."""
    labels = jnp.round(targets).astype(jnp.int32)
    weights = jnp.asarray(norm.class_weights or (1.0,) * spec.num_classes, jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
    loss = jnp.where(graph_mask, weights[labels] * nll, 0.0).sum()
    one_hot = jax.nn.one_hot(labels, spec.num_classes) * graph_mask[:, None]
    correct = one_hot * (jnp.argmax(logits, axis=-1) == labels)[:, None]
    return loss, {"class_count": one_hot.sum(0), "class_correct_count": correct.sum(0)}


def summarize(sums: list[dict], kind: str) -> dict[str, float]:
    """Metric values from the per-batch sums of one pass over a split."""
    total = {k: np.sum([np.asarray(s[k], np.float64) for s in sums], axis=0) for k in sums[0]}
    if kind == "scalar":
        return {"mae": float(total["abs_sum"] / max(total["target_count"], 1.0))}
    if kind == "forces":
        return {"force_mae": float(total["force_abs_sum"] / max(total["force_count"], 1.0))}
    present = total["class_count"] > 0
    recall = total["class_correct_count"][present] / total["class_count"][present]
    return {"balanced_accuracy": float(recall.mean()) if present.any() else 0.0,
            "accuracy": float(total["class_correct_count"].sum() / max(total["class_count"].sum(), 1.0))}
