"""The jit-compiled pre-training step: forward, loss, gradient, guarded update, EMA."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from jmp_jax.data.types import LabeledBatch, TaskNormalization
from jmp_jax.training import loss as loss_lib
from jmp_jax.training import sharding
from jmp_jax.training.optim import ema_update


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    constants: Any      # scale factors: fixed, never trained
    opt_state: Any
    ema_params: Any
    nonfinite_in_a_row: jax.Array


def init_train_state(variables: dict, tx: optax.GradientTransformation) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, constants=variables.get("constants", {}),
                      opt_state=tx.init(params), ema_params=jax.tree.map(jnp.array, params),
                      nonfinite_in_a_row=jnp.zeros((), jnp.int32))


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


def map_shards(fn: Callable, stacked: Any) -> Any:
    """`jax.lax.map(fn, stacked)`; a single shard is passed to `fn` directly: a loop around the model, even
    of one trip, makes XLA keep every backward-pass residual in a stacked buffer and doubles the compile."""
    if jax.tree.leaves(stacked)[0].shape[0] != 1:
        return jax.lax.map(fn, stacked)
    return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], stacked)))


def _mean_over_shards(fn: Callable, params, constants, batch: LabeledBatch, mesh: Mesh | None):
    """Each shard's loss is its own mean (as each DDP rank's is); the global loss averages them.

    Every device runs `fn` on its own shards one after another (`lax.map`): vmapping the model would
    batch its gathers and scatters, which XLA runs about 3x slower on CPU.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()

    def local(params, constants, local_batch):
        losses, aux = map_shards(lambda b: fn(params, constants, b), local_batch)
        aux = {k: (jax.lax.psum(v.sum(0), sharding.DATA_AXES) if k.endswith(("_sum", "_count"))
                   else jax.lax.pmean(v.mean(), sharding.DATA_AXES)) for k, v in aux.items()}
        return jax.lax.pmean(losses.mean(), sharding.DATA_AXES), aux

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(sharding.DATA_AXES)),
                         out_specs=(P(), P()))(params, constants, batch)


def train_step(state: TrainState, batch: LabeledBatch, *, model: nn.Module, tx: optax.GradientTransformation,
               schedule: optax.Schedule, task: int | None,
               norm: TaskNormalization | tuple[TaskNormalization, ...],
               ema_decay: float, mesh: Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step. A non-finite loss or gradient leaves the state unchanged and is counted.

    task / norm: one task's batches, or None / every task's scales for mixed-task batches
    (`shard_loss_and_errors`).
    `batch` has a leading shard axis split over `mesh` (default: every device on the data axis).
    """
    fn = functools.partial(shard_loss_and_errors, model=model, task=task, norm=norm, training=True)
    (loss, aux), grads = jax.value_and_grad(
        lambda p: _mean_over_shards(fn, p, state.constants, batch, mesh), has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # Zeroed gradients keep NaN out of the optimiser state; the update is then discarded anyway.
    safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = tx.update(safe_grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = ema_update(state.ema_params, params, ema_decay)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32),
        params=keep(params, state.params), constants=state.constants,
        opt_state=keep(opt_state, state.opt_state), ema_params=keep(ema, state.ema_params),
        nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), "finite": finite, **aux}
    return new_state, metrics


def eval_step(params, constants, batch: LabeledBatch, *, model: nn.Module, task: int | None,
              norm: TaskNormalization | tuple[TaskNormalization, ...],
              mesh: Mesh | None = None) -> dict[str, jax.Array]:
    """Loss and error sums with the given (usually EMA) parameters, no edge dropout."""
    fn = functools.partial(shard_loss_and_errors, model=model, task=task, norm=norm, training=False)
    loss, aux = _mean_over_shards(fn, params, constants, batch, mesh)
    return {"loss": loss, **aux}
