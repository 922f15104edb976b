"""What the data layer hands to training: a padded, labelled batch and each task's label scales."""
from __future__ import annotations

import dataclasses

import flax.struct
import jax

from jmp_jax.graph.types import GraphBatch


@flax.struct.dataclass
class LabeledBatch:
    """A padded graph batch with its labels (eV, eV/Å). Stacked: every array has a leading shard axis."""

    graphs: GraphBatch
    energy: jax.Array   # (G,)
    forces: jax.Array   # (N, 3)
    targets: jax.Array | None = None  # (G,) one scalar target per graph (fine-tuning); pre-training: None
    task: jax.Array | None = None  # (G,) int32 task of each graph (mixed-task batches; padding graphs 0)


@dataclasses.dataclass(frozen=True)
class TaskNormalization:
    """Per-task scales: targets are divided by the std; the loss terms are multiplied by the coefficients."""

    energy_std: float
    force_std: float
    energy_coefficient: float = 1.0
    force_coefficient: float = 1.0
