"""Training checkpoints with orbax: one step directory holds separate items, so downstream code can read
the EMA weights alone.

Items per step: `params`, `ema_params`, `constants`, `opt_state`, `counters` (step, non-finite streak),
`pipeline` (input position, JSON) and `metadata` (model config, tasks, normalisation, JSON).
`jmp_jax.checkpoint.orbax_io` reads the same `params` / `ema_params` / `constants` / `metadata` items.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jmp_jax.training.train_step import TrainState

ARRAY_ITEMS = ("params", "ema_params", "constants", "opt_state", "counters")


def make_manager(workdir: str, *, save_every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def _state_items(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "ema_params": state.ema_params, "constants": state.constants,
            "opt_state": state.opt_state,
            "counters": {"step": state.step, "nonfinite_in_a_row": state.nonfinite_in_a_row}}


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, pipeline_state: dict, metadata: dict,
         *, force: bool = False) -> bool:
    if step in manager.all_steps():
        return False
    items = {k: ocp.args.StandardSave(v) for k, v in _state_items(state).items()}
    items["pipeline"] = ocp.args.JsonSave(pipeline_state)
    items["metadata"] = ocp.args.JsonSave(metadata)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore_latest(manager: ocp.CheckpointManager, template: TrainState,
                   expected_metadata: dict) -> tuple[TrainState, dict] | None:
    """Restores the newest step into `template`'s structure and shardings; None when there is none.

    A checkpoint written for another model or task set is refused with the differing keys named.
    """
    step = manager.latest_step()
    if step is None:
        return None
    meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))["metadata"]
    differing = sorted(k for k in set(meta) | set(expected_metadata) if meta.get(k) != expected_metadata.get(k))
    if differing:
        raise ValueError(f"checkpoint {manager.directory}/{step} was written by another configuration; "
                         f"differing metadata keys: {differing}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_items(template))
    args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
    args["pipeline"] = ocp.args.JsonRestore()
    got = manager.restore(step, args=ocp.args.Composite(**args))
    state = TrainState(step=got["counters"]["step"], params=got["params"], constants=got["constants"],
                       opt_state=got["opt_state"], ema_params=got["ema_params"],
                       nonfinite_in_a_row=got["counters"]["nonfinite_in_a_row"])
    return state, got["pipeline"]
