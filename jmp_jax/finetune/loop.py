"""The fine-tuning run (docs/jmp_spec.md §4): epochs over the train split, validation every epoch, ReduceLROnPlateau
after the cosine phase, early stopping, best checkpoint on the primary validation metric, final test
with the best weights.

Outputs in the workdir: metrics.jsonl (+ TensorBoard), best/<epoch>/ (orbax: params, constants,
metadata with the task) and results.json (val/test metrics of the best epoch).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from jmp_jax.checkpoint import integrity, orbax_io
from jmp_jax.finetune import loss as loss_lib
from jmp_jax.finetune import optim, weights
from jmp_jax.finetune.data import DataSpec, SplitData
from jmp_jax.finetune.model import FinetuneModel, HeadSpec, backbone_for, predict
from jmp_jax.training.loop import backbone_config, block_execution
from jmp_jax.training.metrics_log import MetricsLog
from jmp_jax.data.types import LabeledBatch


class NonFiniteTrainingError(RuntimeError):
    """A whole epoch of updates was skipped because the loss or gradient was never finite."""


@flax.struct.dataclass
class FinetuneState:
    step: jax.Array
    params: Any
    constants: Any
    opt_state: Any


def head_spec(task: ml_collections.ConfigDict) -> HeadSpec:
    return HeadSpec(kind=task.kind, head=task.head, reduction=task.reduction, num_classes=task.num_classes,
                    dropout=task.dropout, gradient_forces=task.gradient_forces)


def data_spec(config: ml_collections.ConfigDict) -> DataSpec:
    t = config.task
    return DataSpec(source=t.source, cutoff=t.cutoff, max_neighbors=t.max_neighbors, pbc=t.pbc,
                    batch_size=config.data.batch_size, target=t.target if t.kind != "forces" else None,
                    conditional_max_neighbors=t.conditional_max_neighbors)


def normalization(config: ml_collections.ConfigDict, data_dir: str) -> loss_lib.Normalization:
    """The task's statistics; None entries are taken from the train split's metadata."""
    from jmp_jax.data import records
    t = config.task
    meta = records.load_metadata(data_dir, t.source, config.data.train_split)
    if t.kind == "forces":
        force_std = t.force_std or meta["raw"]["forces_std"]
        return loss_lib.Normalization(force_std=float(force_std), coefficient=t.loss_coefficient)
    mean, std = t.target_mean, t.target_std
    if t.kind == "scalar" and t.normalize and (mean is None or std is None):
        stats = meta["targets"][t.target]
        mean, std = (stats["mean"] if mean is None else mean), (stats["std"] if std is None else std)
    if t.kind != "scalar" or not t.normalize:
        mean, std = 0.0, 1.0
    weights_ = tuple(t.class_weights) if t.class_weights else None
    return loss_lib.Normalization(target_mean=float(mean), target_std=float(std), coefficient=t.loss_coefficient,
                                  class_weights=weights_)


def train_step(state: FinetuneState, batch: LabeledBatch, lr_scale: jax.Array, rng: jax.Array, *,
               model: FinetuneModel, tx: optax.GradientTransformation, norm: loss_lib.Normalization):
    """One update; a non-finite loss or gradient leaves the state unchanged."""
    def loss_fn(params):
        out = predict(model, {"params": params, "constants": state.constants}, batch.graphs, train=True, rng=rng)
        return loss_lib.task_loss(out, batch, model.head, norm)

    (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    grads = jax.tree.map(lambda g: jnp.where(finite, g, 0.0), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    # ReduceLROnPlateau: scaling AdamW's whole update scales every group's learning rate.
    updates = jax.tree.map(lambda u: u * lr_scale, updates)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = FinetuneState(step=state.step + finite.astype(jnp.int32), params=keep(params, state.params),
                              constants=state.constants, opt_state=keep(opt_state, state.opt_state))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite, **sums}


def eval_step(params, constants, batch: LabeledBatch, *, model: FinetuneModel, norm: loss_lib.Normalization):
    out = predict(model, {"params": params, "constants": constants}, batch.graphs)
    loss, sums = loss_lib.task_loss(out, batch, model.head, norm)
    return {"loss": loss, **sums}


def evaluate(eval_fn, params, constants, split: SplitData, kind: str) -> dict[str, float]:
    """Metrics of one full pass over a split (stored order)."""
    sums = [jax.device_get(eval_fn(params, constants, b)) for b in split.batches(split.order(None, 0))]
    return {**loss_lib.summarize(sums, kind), "loss": float(np.mean([s["loss"] for s in sums]))}


def optim_config(config: ml_collections.ConfigDict, num_blocks: int, steps_per_epoch: int) -> optim.OptimConfig:
    o = config.optim
    blocks = tuple(o.block_multipliers) if o.block_multipliers else optim.block_lr_multipliers(num_blocks)
    return optim.OptimConfig(
        lr=o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, clip_value=o.clip_value,
        embedding_multiplier=o.embedding_multiplier, block_multipliers=blocks,
        warmup_steps=max(int(o.warmup_epochs * steps_per_epoch), 1),
        total_steps=max(int(o.cosine_epochs * steps_per_epoch), 1),
        warmup_start_factor=o.warmup_start_factor, min_lr_factor=o.min_lr_factor)


def run(config: ml_collections.ConfigDict, workdir: str, init: str = "scratch", init_ema: bool = True
        ) -> dict[str, Any]:
    """Fine-tunes from `init` ("scratch" or a checkpoint path); returns the final metrics and paths.

    Matrix products follow `config.model.matmul_precision` (jax.default_matmul_precision).
    """
    with jax.default_matmul_precision(config.model.matmul_precision):
        return _finetune(config, workdir, init, init_ema)


def _finetune(config: ml_collections.ConfigDict, workdir: str, init: str = "scratch", init_ema: bool = True
        ) -> dict[str, Any]:
    if not config.data.dir:
        raise ValueError("config.data.dir must name the folder with the prepared task shards (data_prep.build)")
    os.makedirs(workdir, exist_ok=True)
    spec, dspec = head_spec(config.task), data_spec(config)
    norm = normalization(config, config.data.dir)
    train = SplitData(config.data.dir, dspec, config.data.train_split, seed=config.seed,
                      num_workers=config.data.num_workers)
    val, test = (SplitData(config.data.dir, dspec, s, train.budgets, num_workers=config.data.num_workers)
                 for s in (config.data.val_split, config.data.test_split))

    backbone = backbone_for(backbone_config(config.model.backbone), spec)
    model = FinetuneModel(backbone, spec, dtype=jnp.dtype(config.model.dtype), execution=block_execution(config))
    variables = weights.random_variables(model, config.seed, config.model.scale_factors, config.model.backbone)
    init_info = {"path": "scratch"}
    if init != "scratch":
        variables, init_info = weights.load_initial_variables(variables, init, backbone, use_ema=init_ema)
        print(f"initialised embedding + backbone from {init_info['path']} (ema={init_info['ema']}; "
              f"{len(init_info['dropped'])} stored leaves dropped)", file=sys.stderr)

    # Epoch-based schedule lengths in steps, as JMP converts them; a batch that closes early on a budget
    # makes an epoch a little longer than this.
    steps_per_epoch = math.ceil(len(train) / config.data.batch_size)
    ocfg = optim_config(config, backbone.num_blocks, steps_per_epoch)
    tx, schedules = optim.finetune_optimizer(variables["params"], ocfg, backbone.num_blocks)
    state = FinetuneState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                          constants=variables.get("constants", {}), opt_state=tx.init(variables["params"]))
    step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, norm=norm), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, model=model, norm=norm))

    metric, mode = loss_lib.PRIMARY_METRIC[spec.kind]
    plateau = optim.PlateauScale(config.optim.plateau_factor, config.optim.plateau_patience, mode)
    tracker = optim.MetricTracker(mode, config.train.early_stopping_min_delta)
    metadata = {**orbax_io.make_metadata(backbone, 0, source=f"finetune:{init_info['path']}", ema=False),
                "finetune": {"task": config.task.to_dict(), "normalization": dataclasses.asdict(norm)}}
    best_dir = os.path.join(os.path.abspath(workdir), "best")
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    manager = integrity.SealingCheckpointManager(best_dir, options=options)  # checksummed best steps
    log = MetricsLog(workdir, config.train.max_epochs * steps_per_epoch)
    rng = jax.random.key(config.seed + 1)
    best_params, best_epoch, best_val, epoch = jax.device_get(state.params), -1, {}, 0
    try:
        for epoch in range(config.train.max_epochs):
            losses, start_step = [], int(state.step)
            for batch in train.batches(train.order(epoch, config.seed)):
                key = jax.random.fold_in(jax.random.fold_in(rng, epoch), len(losses))
                state, m = step_fn(state, batch, jnp.float32(plateau.scale), key)
                losses.append(m["loss"])
            step = int(state.step)
            if step == start_step:
                raise NonFiniteTrainingError(f"epoch {epoch}: every update had a non-finite loss or gradient "
                                             f"(last loss {float(losses[-1])}); see {log.path}")
            val_metrics = evaluate(eval_fn, state.params, state.constants, val, spec.kind)
            lr = max(float(s(step)) for s in schedules.values()) * plateau.scale
            if step >= ocfg.total_steps:  # ReduceLROnPlateau only after the cosine phase, as JMP
                plateau.update(val_metrics[metric])
            improved = tracker.update(val_metrics[metric])
            if improved:
                best_params, best_epoch, best_val = jax.device_get(state.params), epoch, val_metrics
                manager.save(epoch, args=ocp.args.Composite(**orbax_io.save_args(
                    {"params": state.params, "constants": state.constants}, metadata)), force=True)
            log.write(step, {"epoch": epoch, "train/loss": float(np.mean(jax.device_get(losses))), "lr": lr,
                             "lr_scale": plateau.scale, **{f"val/{k}": v for k, v in val_metrics.items()}})
            print(f"epoch {epoch} step {step} val {metric} {val_metrics[metric]:.6g}"
                  f"{' (best)' if improved else ''}", file=sys.stderr)
            if (tracker.epochs_since_best >= config.train.early_stopping_patience
                    or lr < config.train.early_stopping_min_lr):
                break
    finally:
        manager.wait_until_finished()
        manager.close()
        log.close()
    test_metrics = evaluate(eval_fn, best_params, state.constants, test, spec.kind)
    result = {"task": config.task.name, "init": init_info["path"], "epochs": epoch + 1, "best_epoch": best_epoch,
              "primary_metric": metric, "val": best_val, "test": test_metrics,
              "best_checkpoint": os.path.join(best_dir, str(best_epoch)), "metrics": log.path}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
