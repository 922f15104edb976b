"""Initial weights of a fine-tuning model (docs/jmp_spec.md §4.3): embedding + backbone from a checkpoint
(random ones: `training.state.init_variables`).

A checkpoint is anything `orbax_io.load_variables` reads: a pre-training run's checkpoints (EMA weights
by default) or a converted released JMP checkpoint. Pre-training heads (`output/...`) and, for models
without direct forces, the backbone's direct-force branch are dropped; every other backbone leaf must
be present with the right shape.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from flax import traverse_util

from jmp_jax.models.config import BackboneConfig
from jmp_jax.checkpoint.scale_factors import is_direct_force_part

TRANSFERRED = ("embedding", "backbone")


class InitCheckpointError(ValueError):
    """The checkpoint cannot initialise this fine-tuning model (other backbone, missing/mis-shaped leaves)."""


def _flat(tree: Any) -> dict[tuple, Any]:
    return traverse_util.flatten_dict(dict(tree)) if tree else {}


def _check_backbone(metadata: dict, config: BackboneConfig, path: str) -> None:
    fields = metadata.get("config") or metadata.get("backbone")
    if not fields:
        raise InitCheckpointError(f"{path}: checkpoint metadata has no backbone config")
    stored = BackboneConfig.from_jmp_dict(fields)
    # Edge dropout and the force branch are training / task choices, not part of the weights' identity.
    stored = dataclasses.replace(stored, direct_forces=config.direct_forces, edge_dropout=config.edge_dropout)
    if stored != config:
        diffs = [f"{f.name}: checkpoint {getattr(stored, f.name)!r}, model {getattr(config, f.name)!r}"
                 for f in dataclasses.fields(config) if getattr(stored, f.name) != getattr(config, f.name)]
        raise InitCheckpointError(f"{path}: checkpoint backbone differs from the model's: " + "; ".join(diffs))


def transfer(target: dict, stored: dict, path: str) -> tuple[dict, list[str]]:
    """`target` variables with every embedding/backbone leaf replaced by the stored one.

    Returns (variables, dropped stored leaf names). Raises InitCheckpointError on a missing or
    mis-shaped leaf, or a stored backbone leaf the model lacks that is not a direct-force part.
    """
    out, dropped, problems = {}, [], []
    for collection in ("params", "constants"):
        want, have = _flat(target.get(collection)), _flat(stored.get(collection))
        merged = dict(want)
        for key, value in want.items():
            if key[0] not in TRANSFERRED:
                continue
            if key not in have:
                problems.append(f"missing {collection}/{'/'.join(key)}")
            elif np.shape(have[key]) != np.shape(value):
                problems.append(f"shape of {collection}/{'/'.join(key)}: checkpoint {np.shape(have[key])}, "
                                f"model {np.shape(value)}")
            else:
                merged[key] = np.asarray(have[key], np.asarray(value).dtype)
        for key in have.keys() - want.keys():
            name = f"{collection}/{'/'.join(key)}"
            if key[0] in TRANSFERRED and not is_direct_force_part(key):
                problems.append(f"unexpected {name}")
            dropped.append(name)
        out[collection] = traverse_util.unflatten_dict(merged) if merged else {}
    if problems:
        raise InitCheckpointError(f"{path}: cannot initialise the model ({len(problems)} problems):\n  "
                                  + "\n  ".join(problems[:20]))
    return out, sorted(dropped)


def load_initial_variables(target: dict, path: str, config: BackboneConfig, *, use_ema: bool = True
                           ) -> tuple[dict, dict]:
    """Embedding + backbone from the checkpoint at `path` (a run workdir, its checkpoints dir, a
    converter output or a step dir) into `target` (random variables of the model; heads stay random).

    Returns (variables, info {"path", "ema", "dropped"}).
    """
    from jmp_jax.checkpoint import orbax_io  # orbax is heavy: only loading needs it
    path = os.fspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    stored, metadata = orbax_io.load_variables(path, use_ema=use_ema)
    _check_backbone(metadata, config, path)
    variables, dropped = transfer(target, stored, path)
    # "ema": EMA weights were asked for and the checkpoint has them (its own item, or converted EMA weights).
    ema = use_ema and bool(metadata.get("ema"))
    return variables, {"path": os.path.abspath(path), "ema": ema, "dropped": dropped}
