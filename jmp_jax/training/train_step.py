"""The pre-training step on the training core (`training.state`): its loss, forward to loss per batch shard."""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jmp_jax.data.types import LabeledBatch, TaskNormalization
from jmp_jax.training import loss as loss_lib
from jmp_jax.training.state import TrainState, apply_gradient, loss_and_gradient, mean_over_shards, run_step


def shard_loss_and_errors(params, constants, batch: LabeledBatch, *, model: nn.Module, task: int | None,
                          norm: TaskNormalization | tuple[TaskNormalization, ...],
                          training: bool):
    """Loss and error sums of one batch shard (no leading axis).

    task int: every structure is that task's, `norm` its scales. task None: a mixed-task batch, each
    structure with the head and scales (`norm`: one per task) of its own task (`batch.task`); the error
    sums and the per-task loss sums (`task_loss_sum` / `task_loss_count`) are then (T,), one per task.
    """
    g = batch.graphs
    nodes = g.graph.nodes
    node_graph = g.node_graph_index
    graph_mask = g.graph.globals["mask"]
    scales = norm if task is not None else loss_lib.structure_normalization(norm, batch.task)
    out = model.apply({"params": params, "constants": constants}, g, task=batch.task if task is None else task,
                      train=training)
    # Heads predict normalised targets (mean 0, std 1); losses and metrics use physical units.
    energy = out["energy"].astype(jnp.float32) * loss_lib.per_graph(scales.energy_std, g.num_graphs)
    forces = out["forces"].astype(jnp.float32) * loss_lib.per_graph(scales.force_std, g.num_graphs)[node_graph, None]
    total, parts = loss_lib.energy_force_loss(energy, forces, batch.energy, batch.forces, node_graph,
                                              nodes["mask"], graph_mask, scales)
    if task is not None:
        errors = loss_lib.energy_force_errors(energy, forces, batch.energy, batch.forces, nodes["mask"],
                                              ~nodes["fixed"], graph_mask)
        return total, {**parts, **errors}
    errors = loss_lib.errors_by_task(energy, forces, batch.energy, batch.forces, node_graph, nodes["mask"],
                                     ~nodes["fixed"], graph_mask, batch.task, len(norm))
    per_structure = sum(loss_lib.structure_loss_terms(energy, forces, batch.energy, batch.forces, node_graph,
                                                      nodes["mask"], scales))
    real = graph_mask.astype(jnp.float32)
    per_task = {"task_loss_sum": jax.ops.segment_sum(per_structure * real, batch.task, len(norm)),
                "task_loss_count": jax.ops.segment_sum(real, batch.task, len(norm))}
    return total, {**parts, **errors, **per_task}


def train_loss_and_gradient(params, constants, batch: LabeledBatch, *, model: nn.Module, task: int | None,
                            norm: TaskNormalization | tuple[TaskNormalization, ...], mesh: Mesh | None = None):
    """(loss, aux, gradient) of a training batch: the half of `train_step` compiled per batch shape.

    task / norm: one task's batches, or None / every task's scales for mixed-task batches
    (`shard_loss_and_errors`). `batch` has a leading shard axis split over `mesh` (default: every device
    on the data axis).
    """
    fn = functools.partial(shard_loss_and_errors, model=model, task=task, norm=norm, training=True)
    return loss_and_gradient(params, constants, batch, shard_loss=fn, mesh=mesh)


def train_update(state: TrainState, loss: jax.Array, grads, *, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, ema_decay: float) -> tuple[TrainState, dict[str, jax.Array]]:
    """The guarded optimiser update and EMA, with the step's learning rate: the half of `train_step` that
    is compiled once per run. A non-finite loss or gradient leaves the state unchanged and is counted."""
    new_state, metrics = apply_gradient(state, loss, grads, tx=tx, ema_decay=ema_decay)
    return new_state, {**metrics, "lr": schedule(state.step)}


def train_step(state: TrainState, batch: LabeledBatch, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, task: int | None,
               norm: TaskNormalization | tuple[TaskNormalization, ...],
               ema_decay: float, mesh: Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step as one function; the training loop runs its two halves (`train_loss_and_gradient`,
    `train_update`) as separate programs (`state.SplitStep`)."""
    return run_step(state, (batch,),
                    gradient=functools.partial(train_loss_and_gradient, model=model, task=task, norm=norm, mesh=mesh),
                    update=functools.partial(train_update, tx=tx, schedule=schedule, ema_decay=ema_decay))


def eval_step(params, constants, batch: LabeledBatch, *, model: nn.Module, task: int | None,
              norm: TaskNormalization | tuple[TaskNormalization, ...],
              mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Loss and error sums with the given (usually EMA) parameters, no edge dropout."""
    fn = functools.partial(shard_loss_and_errors, model=model, task=task, norm=norm, training=False)
    loss, aux = mean_over_shards(fn, params, constants, batch, mesh)
    return {"loss": loss, **aux}
