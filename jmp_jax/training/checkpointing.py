"""Checkpoints of a training run (pre-training or fine-tuning) with orbax: one step directory holds separate
items, so downstream code can read the (EMA) weights alone.

Items per step: `params`, `ema_params` (runs with an EMA), `constants`, `opt_state`, `counters` (step,
non-finite streak), `pipeline` (input position and the loop's host-side state, JSON), `metadata` (model
config, tasks, normalisation, JSON) and a run's own array items (fine-tuning: `best_params`).
`jmp_jax.checkpoint.orbax_io` writes them (`save_step`) and reads the same `params` / `ema_params` /
`constants` / `metadata` items. Every step gets a checksum manifest once written
(`jmp_jax.checkpoint.integrity`); resuming skips and sets aside damaged steps, falling back to the newest one
that restores completely.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp

from jmp_jax.checkpoint import integrity, orbax_io
from jmp_jax.data.pipeline import merge_states
from jmp_jax.data.process_exchange import ProcessExchange
from jmp_jax.training.state import TrainState


def make_manager(workdir: str, *, save_every: int, keep: int) -> integrity.SealingCheckpointManager:
    # cleanup_tmp_directories: a save killed half-way left an uncommitted temporary folder, never a step.
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True)
    return integrity.SealingCheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                              options=options)


def _state_items(state: TrainState) -> dict[str, Any]:
    """The state's array items; empty ones (no EMA, no scale factors) are not stored."""
    items = {"params": state.params, "ema_params": state.ema_params, "constants": state.constants,
             "opt_state": state.opt_state,
             "counters": {"step": state.step, "nonfinite_in_a_row": state.nonfinite_in_a_row}}
    return {name: tree for name, tree in items.items() if tree}


def save(manager: ocp.CheckpointManager, step: int, state: TrainState, pipeline_state: dict, metadata: dict,
         *, arrays: dict[str, Any] | None = None, force: bool = False,
         exchange: ProcessExchange | None = None) -> bool:
    """Saves `state`, the JSON `pipeline_state` and a run's own `arrays` as checkpoint `step` when it is due
    (or `force`) and new; every process calls it at every step.

    exchange: under `jax.distributed`, joins every process's input position (`pipeline_state` holds this
    process's batch shards) into the saved one, so that each process resumes its own.
    """
    if step in manager.all_steps() or not (force or manager.should_save(step)):
        return False
    if exchange is not None:
        exchange.delete_mine("pipeline/")  # the last save's: every process has read them since
        pipeline_state = merge_states(exchange.allgather(f"pipeline/{step}", pipeline_state))
    items = _state_items(state)
    variables = {"params": items.pop("params"), "constants": items.pop("constants", None)}
    return orbax_io.save_step(manager, step, variables, metadata, ema_params=items.pop("ema_params", None),
                              arrays={**items, **(arrays or {})}, json_items={"pipeline": pipeline_state},
                              force=force)


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return integrity.step_dir(manager.directory, step)


def _set_aside(manager: ocp.CheckpointManager, step: int, err: integrity.CheckpointDamagedError) -> None:
    """Moves the damaged step out of the manager's reach and says so in one line.

    Under `jax.distributed` every process finds the same damage (they verify the same files); the first
    moves the step, the others wait for it.
    """
    if jax.process_index() == 0:
        moved = integrity.set_aside(_step_path(manager, step))
        print(f"skipped {err}; moved it to {moved}", file=sys.stderr)
    ocp.multihost.sync_global_processes(f"jmp_jax_set_aside_{step}")  # a step is set aside once per start
    manager.reload()


def newest_intact(manager: ocp.CheckpointManager) -> tuple[int, dict] | None:
    """(step, metadata) of the newest step whose files match their checksums; None when there is none.

    Damaged steps are moved aside (never deleted) with one line each on stderr.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            integrity.verify(_step_path(manager, step))
            return step, integrity.restore_items(manager, step, {"metadata": ocp.args.JsonRestore()})["metadata"]
        except integrity.CheckpointDamagedError as err:
            _set_aside(manager, step, err)
    return None


def _differences(stored: Any, expected: Any, key: str) -> list[str]:
    """Dotted keys where `stored` differs from `expected` (dicts: only expected's keys are compared)."""
    if isinstance(expected, dict) and isinstance(stored, dict):
        return [d for k in expected for d in _differences(stored.get(k), expected[k], f"{key}.{k}" if key else k)]
    if isinstance(expected, list) and isinstance(stored, list) and len(expected) == len(stored):
        return [d for i, (s, e) in enumerate(zip(stored, expected)) for d in _differences(s, e, f"{key}[{i}]")]
    return [] if stored == expected else [key]


def check_metadata(manager: ocp.CheckpointManager, step: int, stored: dict, expected: dict) -> None:
    """Raises a one-line ValueError naming every metadata key (e.g. `config.emb_size_atom`) that differs.

    expected may hold only part of the metadata (what is known before the data set-up).
    """
    differing = _differences(stored, expected, "")
    if differing:
        first = differing[0]
        raise ValueError(
            f"{integrity.describe(_step_path(manager, step))} was written by another configuration: metadata "
            f"{', '.join(differing)} differ (e.g. {first}: checkpoint {_lookup(stored, first)!r}, this run "
            f"{_lookup(expected, first)!r}); use another --workdir")


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.replace("[", ".[").split("."):
        if tree is None:
            return None
        tree = tree[int(part[1:-1])] if part.startswith("[") else tree.get(part)
    return tree


def restore(manager: ocp.CheckpointManager, found: tuple[int, dict] | None, template: TrainState,
            expected_metadata: dict, arrays: dict[str, Any] | None = None
            ) -> tuple[TrainState, dict, dict[str, Any]] | None:
    """(state, pipeline state, the run's own arrays) of `found` (from `newest_intact`), restored into the
    structure and shardings of `template` and `arrays`, falling back to older steps while one does not
    read; None when no step is left.

    A step of another configuration is refused (ValueError naming the keys). A sealed step whose verified
    files orbax cannot restore is an error too (the files are as saved, so the cause is not damage).
    """
    arrays = arrays or {}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, {**_state_items(template), **arrays})
    args = {k: ocp.args.StandardRestore(v) for k, v in abstract.items()}
    args["pipeline"] = ocp.args.JsonRestore()
    while found is not None:
        step, metadata = found
        check_metadata(manager, step, metadata, expected_metadata)
        try:
            got = integrity.restore_items(manager, step, args)
        except integrity.CheckpointDamagedError as err:
            if integrity.has_manifest(_step_path(manager, step)):  # verified files: not damage, another structure
                raise ValueError(f"{err} (its files match their checksums: was it written by another version "
                                 f"of the training state?)") from err.__cause__
            _set_aside(manager, step, err)
            found = newest_intact(manager)
            continue
        state = TrainState(step=got["counters"]["step"], params=got["params"],
                           constants=got.get("constants", template.constants), opt_state=got["opt_state"],
                           ema_params=got.get("ema_params"),
                           nonfinite_in_a_row=got["counters"]["nonfinite_in_a_row"])
        return state, got["pipeline"], {name: got[name] for name in arrays}
    return None
