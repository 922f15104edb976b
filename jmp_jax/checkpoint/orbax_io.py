"""Orbax checkpoints of JMP model variables, shared by the converter and the training loop.

Layout: a `CheckpointManager` directory `<root>/<step>/` holding the items
  `params`      (StandardSave) the weights to use: converted weights, or raw training weights;
  `ema_params`  (StandardSave, optional) EMA weights, written by the training loop;
  `constants`   (StandardSave, omitted when empty) non-trainable scale factors;
  `metadata`    (JsonSave) {"format", "config": BackboneConfig.to_dict(), "num_tasks", "source", "ema"}.
Every writer goes through `save_step`; training runs add their own items (optimizer state, ...) there.
Saved steps carry a checksum manifest (`jmp_jax.checkpoint.integrity`), verified for the items read here.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from jmp_jax.checkpoint import integrity
from jmp_jax.checkpoint.names import CheckpointMismatchError
from jmp_jax.models.config import BackboneConfig

PARAMS, EMA_PARAMS, CONSTANTS, METADATA = "params", "ema_params", "constants", "metadata"
FORMAT = "jmp_jax.variables/1"


def make_metadata(config: BackboneConfig, num_tasks: int, source: str, ema: bool) -> dict[str, Any]:
    """The JSON metadata item: enough to rebuild `JMPModel(config, num_tasks)` and to audit the weights."""
    return {"format": FORMAT, "config": config.to_dict(), "num_tasks": int(num_tasks),
            "source": str(source), "ema": bool(ema)}


def item_handlers() -> dict[str, ocp.CheckpointHandler]:
    """Handlers for this module's items, for a CheckpointManager that restores them."""
    tree = {name: ocp.StandardCheckpointHandler() for name in (PARAMS, EMA_PARAMS, CONSTANTS)}
    return {**tree, METADATA: ocp.JsonCheckpointHandler()}


def save_args(variables: Mapping[str, Any], metadata: Mapping[str, Any],
              ema_params: Any = None) -> dict[str, ocp.args.CheckpointArgs]:
    """Composite items for `manager.save(step, args=ocp.args.Composite(**save_args(...), **more))`.

    variables: Flax variables {"params": ..., "constants": ...}; empty trees are left out (orbax refuses them).
    """
    items = {PARAMS: variables["params"], CONSTANTS: variables.get("constants"), EMA_PARAMS: ema_params}
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items() if tree}
    args[METADATA] = ocp.args.JsonSave(dict(metadata))
    return args


def save_step(manager: ocp.CheckpointManager, step: int, variables: Mapping[str, Any], metadata: Mapping[str, Any],
              *, ema_params: Any = None, arrays: Mapping[str, Any] | None = None,
              json_items: Mapping[str, Any] | None = None, force: bool = False) -> bool:
    """The checkpoint writer: one step of `variables` (+ EMA) and `metadata`, with a run's own array items
    (optimizer state, ...) and JSON items (input position, ...). False if the step exists (a rerun reached
    a step it had saved before: same contents) or the manager's interval skips it.
    """
    if step in manager.all_steps():
        return False
    args = save_args(variables, metadata, ema_params)
    args.update({name: ocp.args.StandardSave(tree) for name, tree in (arrays or {}).items()})
    args.update({name: ocp.args.JsonSave(value) for name, value in (json_items or {}).items()})
    return manager.save(step, args=ocp.args.Composite(**args), force=force)


def save_variables(directory: str | os.PathLike, variables: Mapping[str, Any], metadata: Mapping[str, Any],
                   step: int = 0) -> str:
    """Writes one step of `variables` + `metadata` under `directory`; returns the step directory."""
    directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with integrity.SealingCheckpointManager(directory, options=options) as manager:
        save_step(manager, step, variables, metadata, force=True)
        manager.wait_until_finished()
    return os.path.join(directory, str(step))


def _root_and_step(path: str) -> tuple[str, int]:
    """(manager root, step) for a manager root (latest step) or one of its step directories."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise CheckpointMismatchError(f"no checkpoint directory at {path}")
    steps = [int(n) for n in os.listdir(path) if n.isdigit() and os.path.isdir(os.path.join(path, n))]
    if steps:
        return path, max(steps)
    name = os.path.basename(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, METADATA)):
        return os.path.dirname(path), int(name)
    raise CheckpointMismatchError(f"{path} is neither a checkpoint directory with steps nor a step directory")


def _manager(root: str) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(root, item_handlers=item_handlers(),
                                 options=ocp.CheckpointManagerOptions(create=False))


def _restore_metadata(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    integrity.verify(integrity.step_dir(manager.directory, step), items=[METADATA])
    return dict(integrity.restore_items(manager, step, {METADATA: ocp.args.JsonRestore()})[METADATA])


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata item of a checkpoint (manager root: latest step)."""
    root, step = _root_and_step(os.fspath(path))
    with _manager(root) as manager:
        return _restore_metadata(manager, step)


def verify_metadata(metadata: Mapping[str, Any], config: BackboneConfig | None,
                    num_tasks: int | None = None) -> None:
    """Raises CheckpointMismatchError listing every config field (and num_tasks) that differs."""
    stored = BackboneConfig.from_jmp_dict(metadata["config"])
    diffs = []
    if config is not None:
        diffs = [f"{f.name}: checkpoint {getattr(stored, f.name)!r}, expected {getattr(config, f.name)!r}"
                 for f in dataclasses.fields(BackboneConfig) if getattr(stored, f.name) != getattr(config, f.name)]
    if num_tasks is not None and metadata.get("num_tasks") != num_tasks:
        diffs.append(f"num_tasks: checkpoint {metadata.get('num_tasks')!r}, expected {num_tasks!r}")
    if diffs:
        raise CheckpointMismatchError("checkpoint from another config:\n  " + "\n  ".join(diffs))


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'a/b/c': shape} for every leaf of a tree of arrays / ShapeDtypeStructs / orbax ArrayMetadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def verify_tree(stored: Any, expected: Any, item: str) -> None:
    """Raises CheckpointMismatchError listing missing, unexpected and mis-shaped leaves of `item`."""
    have, want = _flat_shapes(stored), _flat_shapes(expected)
    problems = [f"missing {k} {want[k]}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k} {have[k]}" for k in sorted(set(have) - set(want))]
    problems += [f"shape of {k}: checkpoint {have[k]}, expected {want[k]}"
                 for k in sorted(set(have) & set(want)) if have[k] != want[k]]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint from another config: '{item}' tree does not match ({len(problems)} problems):\n  "
            + "\n  ".join(problems))


def _abstract(tree_metadata: Any) -> Any:
    """Restore target on the default device built from stored shapes/dtypes (stored shardings may not exist here)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, np.dtype(m.dtype), sharding=sharding),
                        tree_metadata.tree if hasattr(tree_metadata, "tree") else tree_metadata)


def load_variables(path: str | os.PathLike, config: BackboneConfig | None = None, num_tasks: int | None = None,
                   target: Mapping[str, Any] | None = None, use_ema: bool = True
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores ({"params", "constants"}, metadata) from a converter output or a training checkpoint.

    path: manager root (latest step) or a step directory. With `use_ema`, a stored `ema_params` item
    replaces `params`. `config`/`num_tasks` are checked against the metadata and `target` (a variables
    tree of arrays or ShapeDtypeStructs) against the stored shapes before any array is read.
    """
    root, step = _root_and_step(os.fspath(path))
    with _manager(root) as manager:
        metadata = _restore_metadata(manager, step)
        verify_metadata(metadata, config, num_tasks)
        integrity.verify(integrity.step_dir(root, step), items=[PARAMS, CONSTANTS] + [EMA_PARAMS] * use_ema)
        with integrity.reading(integrity.step_dir(root, step), "the items' metadata"):
            stored = manager.item_metadata(step)
        params_item = EMA_PARAMS if use_ema and stored.get(EMA_PARAMS) is not None else PARAMS
        items = {"params": params_item, "constants": CONSTANTS}
        if stored.get(PARAMS) is None:
            raise CheckpointMismatchError(f"{root}/{step} has no '{PARAMS}' item")
        if target is not None:
            for collection, item in items.items():
                verify_tree(stored.get(item) or {}, target.get(collection, {}), item)
        restore = {item: ocp.args.StandardRestore(_abstract(stored[item]))
                   for item in items.values() if stored.get(item) is not None}
        restored = integrity.restore_items(manager, step, restore)
    variables = {collection: restored[item] if item in restore else {} for collection, item in items.items()}
    if params_item == EMA_PARAMS:
        metadata["ema"] = True
    return variables, metadata
