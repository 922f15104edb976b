"""The training core shared by pre-training and fine-tuning: the train state, its variable init, the loss
averaged over batch shards on the device mesh, and the guarded update (a non-finite step is skipped).

A run supplies its per-shard loss (`shard_loss(params, constants, shard) -> (loss, aux)`) and optimiser;
`loss_and_gradient`, `apply_gradient` and `run_step` do the rest. Pre-training's loss is
`train_step.shard_loss_and_errors`, fine-tuning's `finetune.loop.shard_loss`.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from jmp_jax.checkpoint.scale_factors import fitted_constants
from jmp_jax.models.jmp import placeholder_batch
from jmp_jax.training import sharding
from jmp_jax.training.optim import ema_update


@flax.struct.dataclass
class TrainState:
    step: jax.Array               # updates applied (skipped non-finite steps do not count)
    params: Any
    constants: Any                # scale factors: fixed, never trained
    opt_state: Any
    ema_params: Any               # None for runs without an EMA (fine-tuning)
    nonfinite_in_a_row: jax.Array


def init_variables(model: nn.Module, seed: int, scale_factors: str, backbone_name: str) -> dict:
    """Random variables of `model`; scale factors JMP fitted for this size ("fitted") or all 1 ("none").

    Initialised op by op, not compiled (compiling the whole init is slower), and lazily: the batch is given as
    shapes only, so the forward pass is traced but not run (parameter shapes do not depend on its values).
    Clears jax's caches afterwards (`jax.clear_caches`): the hundreds of one-off programs of the op-by-op
    init would otherwise stay cached for the life of the process (about 0.3 GB of host memory for JMP-S,
    BENCHMARKS.md "Host memory of the initialisation"); programs compiled before are compiled again on use.
    """
    batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), placeholder_batch())
    variables = dict(model.lazy_init(jax.random.key(seed), batch_shapes))
    jax.clear_caches()
    if scale_factors == "fitted":
        variables["constants"] = fitted_constants(backbone_name, variables["constants"],
                                                  direct_forces=model.config.direct_forces)
    elif scale_factors != "none":
        raise ValueError(f"model.scale_factors must be 'fitted' or 'none', not {scale_factors!r}")
    return variables


def init_train_state(variables: dict, tx: optax.GradientTransformation, ema: bool = True) -> TrainState:
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, constants=variables.get("constants", {}),
                      opt_state=tx.init(params), ema_params=jax.tree.map(jnp.array, params) if ema else None,
                      nonfinite_in_a_row=jnp.zeros((), jnp.int32))


def map_shards(fn: Callable, stacked: Any) -> Any:
    """`jax.lax.map(fn, stacked)`; a single shard is passed to `fn` directly: a loop around the model, even
    of one trip, makes XLA keep every backward-pass residual in a stacked buffer and doubles the compile."""
    if jax.tree.leaves(stacked)[0].shape[0] != 1:
        return jax.lax.map(fn, stacked)
    return jax.tree.map(lambda x: x[None], fn(jax.tree.map(lambda x: x[0], stacked)))


def mean_over_shards(shard_loss: Callable, params, constants, shards: Any, mesh: Mesh | None):
    """(loss, aux) of a stack of batch shards (leading axis, split over `mesh`'s devices).

    Each shard's loss is its own mean (as each DDP rank's is); the global loss averages them. Aux values
    named `*_sum` / `*_count` are summed over shards, the others averaged. Every device runs `shard_loss`
    on its own shards one after another (`lax.map`): vmapping the model would batch its gathers and
    scatters, which XLA runs about 3x slower on CPU.
    """
    mesh = mesh if mesh is not None else sharding.make_mesh()

    def local(params, constants, local_shards):
        losses, aux = map_shards(lambda b: shard_loss(params, constants, b), local_shards)
        aux = {k: (jax.lax.psum(v.sum(0), sharding.DATA_AXES) if k.endswith(("_sum", "_count"))
                   else jax.lax.pmean(v.mean(), sharding.DATA_AXES)) for k, v in aux.items()}
        return jax.lax.pmean(losses.mean(), sharding.DATA_AXES), aux

    return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(sharding.DATA_AXES)),
                         out_specs=(P(), P()))(params, constants, shards)


def guarded_update(state: TrainState, loss: jax.Array, grads: Any, tx: optax.GradientTransformation, *,
                   ema_decay: float | None = None, lr_scale: jax.Array | None = None
                   ) -> tuple[TrainState, jax.Array, jax.Array]:
    """(new state, gradient norm, finite): the optimiser update, unless the loss or gradient is not finite;
    then the state is unchanged and `nonfinite_in_a_row` counts it.

    lr_scale: a factor on the whole update (fine-tuning's ReduceLROnPlateau scales every group's rate).
    """
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state: TrainState, grads: Any) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if lr_scale is not None:
            updates = jax.tree.map(lambda u: u * lr_scale, updates)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, ema_decay) if ema_decay is not None else state.ema_params
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema,
                             nonfinite_in_a_row=jnp.zeros_like(state.nonfinite_in_a_row))

    def skip(state: TrainState, grads: Any) -> TrainState:
        del grads
        return state.replace(nonfinite_in_a_row=state.nonfinite_in_a_row + 1)

    # A conditional, not a select between the new and the old state: with a select every old leaf is read by two
    # kernels that XLA cannot order, so it copies the donated state first (JMP-S: 1,057 copies instead of 3,
    # 265 instead of 153 MiB of temporaries, 3,204 instead of 2,529 kernels). The branch not taken does not run.
    return jax.lax.cond(finite, update, skip, state, grads), grad_norm, finite


def loss_and_gradient(params, constants, shards: Any, *, shard_loss: Callable,
                      mesh: Mesh | None = None) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """(loss, aux, gradient w.r.t. params) of a stack of batch shards (`mean_over_shards`): the part of a
    step that depends on the batch shape."""
    (loss, aux), grads = jax.value_and_grad(
        lambda p: mean_over_shards(shard_loss, p, constants, shards, mesh), has_aux=True)(params)
    return loss, aux, grads


def apply_gradient(state: TrainState, loss: jax.Array, grads: Any, lr_scale: jax.Array | None = None, *,
                   tx: optax.GradientTransformation, ema_decay: float | None = None
                   ) -> tuple[TrainState, dict[str, jax.Array]]:
    """The guarded update (`guarded_update`) with metrics loss, grad_norm and finite: the part of a step
    whose shapes never change."""
    new_state, grad_norm, finite = guarded_update(state, loss, grads, tx, ema_decay=ema_decay, lr_scale=lr_scale)
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}


def run_step(state: TrainState, inputs: tuple, update_inputs: tuple = (), *, gradient: Callable,
             update: Callable) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step from its two halves: `gradient(params, constants, *inputs) -> (loss, aux, grads)`
    (e.g. `loss_and_gradient`), then `update(state, loss, grads, *update_inputs) -> (state, metrics)` (e.g.
    `apply_gradient`). Metrics: the update's and the shards' aux values.

    Traced whole inside one jit, or called with separately jitted halves (`SplitStep`, as the loops do).
    """
    loss, aux, grads = gradient(state.params, state.constants, *inputs)
    new_state, metrics = update(state, loss, grads, *update_inputs)
    return new_state, {**metrics, **aux}


class SplitStep:
    """A training step run as two compiled programs (`run_step`): the gradient, compiled once per batch
    shape, and the update, compiled once per run. One program per shape would compile the optimiser
    (hundreds of parameter leaves: AdamW, clipping, EMA, guards) again for every shape: about 40% of a
    JMP-S step's compile (BENCHMARKS.md).
    """

    def __init__(self, gradient: Callable, update: Callable):
        self.gradient, self.update = gradient, update

    def __call__(self, state: TrainState, *inputs, update_inputs: tuple = ()):
        return run_step(state, inputs, update_inputs, gradient=self.gradient, update=self.update)
