"""Optimiser of JMP pre-training (docs/jmp_spec.md §3.5): AdamW, warm-up + cosine, shared-basis gradient
scaling, EMA."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

# Basis projections shared by every interaction block: JMP divides their gradients by the number of
# blocks that use them (docs/jmp_spec.md §1.3), so a shared weight does not learn num_blocks times faster.
SHARED_BY_INTERACTION_BLOCKS = (
    "mlp_rbf_tint", "mlp_cbf_tint", "mlp_rbf_h", "mlp_rbf_qint", "mlp_cbf_qint", "mlp_sbf_qint",
    "mlp_rbf_aeint", "mlp_cbf_aeint", "mlp_rbf_eaint", "mlp_cbf_eaint", "mlp_rbf_aint",
)
SHARED_BY_OUTPUT_BLOCKS = ("mlp_rbf_out",)


def warmup_cosine_schedule(peak_lr: float, warmup_steps: int, total_steps: int,
                           warmup_start_factor: float = 0.2, min_lr_factor: float = 0.1,
                           restart: bool = True) -> optax.Schedule:
    """JMP's LinearWarmupCosineAnnealingLR in closed form.

    lr(s) = peak * (f0 + (1 - f0) * s / (W - 1))                        for s < W
    lr(s) = eta + (peak - eta) * (1 + cos(pi * (s - W) / (T - W))) / 2  otherwise, eta = min_factor * peak
    With `restart` the cosine continues periodically past T, as JMP's `should_restart=True` does;
    without it the rate stays at eta after T (fine-tuning's `should_restart=False`).
    """
    eta = min_lr_factor * peak_lr
    ramp = max(warmup_steps - 1, 1)
    decay = max(total_steps - warmup_steps, 1)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        if not restart:
            step = jnp.minimum(step, float(max(total_steps, warmup_steps)))
        warm = peak_lr * (warmup_start_factor + (1.0 - warmup_start_factor) * step / ramp)
        cosine = eta + (peak_lr - eta) * (1.0 + jnp.cos(math.pi * (step - warmup_steps) / decay)) / 2.0
        return jnp.where(step < warmup_steps, warm, cosine)

    return schedule


def shared_basis_gradient_scales(params: Any, num_blocks: int) -> Any:
    """A tree like `params` holding each leaf's gradient multiplier (1, 1/num_blocks or 1/(num_blocks+1))."""

    def scale_of(path, _):
        names = [getattr(k, "key", None) for k in path]
        if "bases" in names:
            if any(n in SHARED_BY_INTERACTION_BLOCKS for n in names):
                return 1.0 / num_blocks
            if any(n in SHARED_BY_OUTPUT_BLOCKS for n in names):
                return 1.0 / (num_blocks + 1)
        return 1.0

    return jax.tree_util.tree_map_with_path(scale_of, params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies every update leaf by the matching constant in `scales`."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s if s != 1.0 else u, updates, scales), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def pretrain_optimizer(params: Any, *, num_blocks: int, peak_lr: float, warmup_steps: int,
                       total_steps: int, b1: float = 0.9, b2: float = 0.95, weight_decay: float = 0.1,
                       clip_norm: float = 1.0, warmup_start_factor: float = 0.2,
                       min_lr_factor: float = 0.1) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Shared-basis scaling, then global-norm clipping, then AdamW (the order Lightning applies them)."""
    schedule = warmup_cosine_schedule(peak_lr, warmup_steps, total_steps, warmup_start_factor, min_lr_factor)
    tx = optax.chain(
        scale_by_tree(shared_basis_gradient_scales(params, num_blocks)),
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay),
    )
    return tx, schedule


def ema_update(ema_params: Any, params: Any, decay: float) -> Any:
    """NeMo-style EMA without warm-up or bias correction: ema <- decay * ema + (1 - decay) * params."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params, params)
