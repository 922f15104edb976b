"""Fine-tuning optimisation (docs/jmp_spec.md §4.1): layer-wise learning-rate decay as an optax multi-transform,
per-group warm-up + cosine, ReduceLROnPlateau after the cosine phase, early stopping.

Groups (JMP `param_specific_util.PARAMETER_PATTERNS`): `embedding` (0.3 x lr); `blocks_i` =
interaction block i + output block i+1 (blocks_0 also holds output block 0); `rest` = bases,
out_mlp_E and the new heads (1 x lr). Each group warms up linearly from 0.1 x its peak, then decays by
cosine to min_lr_factor / multiplier (clipped to [0.01, 0.99]) of its peak, so every group ends the
cosine phase near min_lr_factor x lr, as JMP's per-group schedules do. ReduceLROnPlateau is a host-side
factor applied to the whole AdamW update (equivalent to scaling every group's rate).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import numpy as np
import optax

from jmp_jax.training.optim import scale_by_tree, shared_basis_gradient_scales, warmup_cosine_schedule

EMBEDDING_LR_MULTIPLIER = 0.3
# JMP-L's per-block multipliers (config/all-jmp-l-configs.py:121-132), the only profile JMP released; other
# depths resample it. JMP-S's 4 values are therefore not JMP's (configs/finetune/common.py says so and why).
JMP_L_BLOCK_LR_MULTIPLIERS = (0.55, 0.40, 0.30, 0.40, 0.55, 0.625)
REST = "rest"


def block_lr_multipliers(num_blocks: int) -> tuple[float, ...]:
    """JMP-L's 6-block profile linearly resampled to `num_blocks` (exact for 6). JMP-S has 4 blocks, for
    which JMP released no values: (0.55, 0.333333, 0.45, 0.625) here, our choice, not JMP's."""
    profile = np.asarray(JMP_L_BLOCK_LR_MULTIPLIERS)
    if num_blocks == len(profile):
        return tuple(float(v) for v in profile)
    where = np.linspace(0.0, len(profile) - 1.0, num_blocks)
    return tuple(float(round(v, 6)) for v in np.interp(where, np.arange(len(profile)), profile))


def param_group(path: tuple) -> str:
    """The learning-rate group of a parameter from its tree path."""
    names = [str(getattr(k, "key", k)) for k in path]
    if names[0] == "embedding":
        return "embedding"
    if names[0] == "backbone" and len(names) > 1:
        match = re.fullmatch(r"(int|out)_blocks_(\d+)", names[1])
        if match:
            index = int(match[2])
            return f"blocks_{index if match[1] == 'int' else max(index - 1, 0)}"
    return REST


def param_groups(params: Any) -> Any:
    """A tree like `params` holding each leaf's group name."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW + value clipping + layer-wise LR decay + warm-up/cosine (steps), as JMP fine-tunes."""

    lr: float = 8e-5
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_value: float = 1.0
    embedding_multiplier: float = EMBEDDING_LR_MULTIPLIER
    block_multipliers: tuple[float, ...] = JMP_L_BLOCK_LR_MULTIPLIERS
    warmup_steps: int = 1
    total_steps: int = 2                   # end of the cosine phase (warm-up included)
    warmup_start_factor: float = 0.1
    min_lr_factor: float = 0.1


def group_multipliers(config: OptimConfig, num_blocks: int) -> dict[str, float]:
    if len(config.block_multipliers) != num_blocks:
        raise ValueError(f"{len(config.block_multipliers)} block LR multipliers for a {num_blocks}-block backbone")
    return {"embedding": config.embedding_multiplier, REST: 1.0,
            **{f"blocks_{i}": float(m) for i, m in enumerate(config.block_multipliers)}}


def group_schedules(config: OptimConfig, num_blocks: int) -> dict[str, optax.Schedule]:
    """Per-group learning rate as a function of the optimiser step (before any plateau reduction)."""
    out = {}
    for name, multiplier in group_multipliers(config, num_blocks).items():
        min_factor = float(np.clip(config.min_lr_factor / multiplier, 0.01, 0.99))
        out[name] = warmup_cosine_schedule(config.lr * multiplier, config.warmup_steps, config.total_steps,
                                           config.warmup_start_factor, min_factor, restart=False)
    return out


def finetune_optimizer(params: Any, config: OptimConfig, num_blocks: int
                       ) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """Shared-basis gradient division, clipping by value, then one AdamW per LR group."""
    schedules = group_schedules(config, num_blocks)
    labels = param_groups(params)
    used = set(jax.tree.leaves(labels))
    groups = {name: optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                weight_decay=config.weight_decay)
              for name, schedule in schedules.items() if name in used}
    tx = optax.chain(
        scale_by_tree(shared_basis_gradient_scales(params, num_blocks)),
        optax.clip(config.clip_value),
        optax.multi_transform(groups, labels),
    )
    return tx, schedules


class PlateauScale:
    """torch's ReduceLROnPlateau (threshold_mode "rel", cooldown 0) as a factor on every group's rate:
    after more than `patience` validations without an improvement beyond `threshold` (relative), the
    factor is multiplied by `factor`. Host-side: it is updated once per validation, outside jit."""

    def __init__(self, factor: float, patience: int, mode: str, threshold: float = 1e-4):
        if mode not in ("min", "max"):
            raise ValueError(f"plateau mode must be 'min' or 'max', not {mode!r}")
        self.factor, self.patience, self.mode, self.threshold = factor, patience, mode, threshold
        self.best = float("inf") if mode == "min" else float("-inf")
        self.bad_epochs = 0
        self.scale = 1.0

    def _improves(self, value: float) -> bool:
        if self.mode == "min":
            return value < self.best * (1.0 - self.threshold)
        return value > self.best * (1.0 + self.threshold)

    def update(self, metric: float) -> float:
        if self._improves(metric):
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scale *= self.factor
            self.bad_epochs = 0
        return self.scale


class MetricTracker:
    """Best value of the validation metric and epochs since it last improved by more than min_delta
    (Lightning's EarlyStopping / ModelCheckpoint rule)."""

    def __init__(self, mode: str, min_delta: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"metric mode must be 'min' or 'max', not {mode!r}")
        self.sign, self.min_delta = (1.0 if mode == "min" else -1.0), min_delta
        self.best = float("inf") if mode == "min" else float("-inf")
        self.epochs_since_best = 0

    def update(self, value: float) -> bool:
        """Records one validation; True if it is a new best."""
        if self.sign * value < self.sign * self.best - self.min_delta:
            self.best, self.epochs_since_best = value, 0
            return True
        self.epochs_since_best += 1
        return False
