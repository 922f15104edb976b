"""The fine-tuning run (docs/jmp_spec.md §4) on the training core (`training.state`, `training.checkpointing`):
epochs over the train split, validation every epoch, ReduceLROnPlateau after the cosine phase, early stopping,
best checkpoint on the primary validation metric, final test with the best weights.

Every device takes part: each step is `num_batch_shards` batches split over the ('data', 'fsdp') mesh, as in
pre-training, and the results do not depend on the number of devices. The run is resumable: checkpoints of
the whole run (train state, best weights, epoch and position in it, plateau / early-stopping state) every
`train.checkpoint_every` steps and at each epoch's end; rerunning the same command in the same workdir after
a kill continues and ends with the results of an uninterrupted run.

Outputs in the workdir: metrics.jsonl (+ TensorBoard), checkpoints/<step>/ (resumable), best/<epoch>/
(orbax: params, constants, metadata with the task) and results.json (val/test metrics of the best epoch).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jmp_jax import program_store
from jmp_jax.checkpoint import integrity, orbax_io
from jmp_jax.data.types import LabeledBatch
from jmp_jax.finetune import loss as loss_lib
from jmp_jax.finetune import optim, weights
from jmp_jax.finetune.data import DataSpec, SplitData
from jmp_jax.finetune.model import FinetuneModel, HeadSpec, backbone_for, predict
from jmp_jax.training import checkpointing, sharding
from jmp_jax.training.loop import backbone_config, block_execution
from jmp_jax.training.metrics_log import MetricsLog
from jmp_jax.training.state import (SplitStep, TrainState, apply_gradient, init_train_state, init_variables,
                                   loss_and_gradient, mean_over_shards, run_step)


class NonFiniteTrainingError(RuntimeError):
    """A whole epoch of updates was skipped because the loss or gradient was never finite."""


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


def shard_loss(params, constants, shard: tuple, *, model: FinetuneModel, norm: loss_lib.Normalization,
               train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metric sums) of one batch shard; `shard` = (batch, real, weight, dropout key or None).

    real (1 or 0) zeroes a padding shard's sums; weight (= real x shards / real shards) makes the mean over
    shards a mean over the real ones.
    """
    batch, real, weight, key = shard
    out = predict(model, {"params": params, "constants": constants}, batch.graphs, train=train, rng=key)
    loss, sums = loss_lib.task_loss(out, batch, model.head, norm)
    return loss * weight, {k: v * real for k, v in sums.items()}


def _shard_weights(real: jax.Array) -> jax.Array:
    return real * (real.shape[0] / jnp.maximum(real.sum(), 1.0))


def train_loss_and_gradient(params, constants, batch: LabeledBatch, real: jax.Array, key: jax.Array, *,
                            model: FinetuneModel, norm: loss_lib.Normalization, mesh: Mesh | None = None):
    """(loss, aux, gradient) of a stack of batch shards (`batch`, `real` with a leading shard axis): the half
    of a step compiled per batch shape (`state.SplitStep`). key: the step's dropout key (shard s uses
    fold_in(key, s))."""
    keys = jax.vmap(lambda s: jax.random.fold_in(key, s))(jnp.arange(real.shape[0]))
    fn = functools.partial(shard_loss, model=model, norm=norm, train=True)
    return loss_and_gradient(params, constants, (batch, real, _shard_weights(real), keys), shard_loss=fn,
                             mesh=mesh)


def train_step(state: TrainState, batch: LabeledBatch, real: jax.Array, key: jax.Array, lr_scale: jax.Array, *,
               model: FinetuneModel, tx: optax.GradientTransformation, norm: loss_lib.Normalization,
               mesh: Mesh | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update as one function (the loop runs its halves as a `SplitStep`); a non-finite loss or gradient
    leaves the state unchanged. lr_scale: ReduceLROnPlateau's factor on every group's rate."""
    return run_step(state, (batch, real, key), (lr_scale,),
                    gradient=functools.partial(train_loss_and_gradient, model=model, norm=norm, mesh=mesh),
                    update=functools.partial(apply_gradient, tx=tx))


def eval_step(params, constants, batch: LabeledBatch, real: jax.Array, *, model: FinetuneModel,
              norm: loss_lib.Normalization, mesh: Mesh | None = None) -> dict[str, jax.Array]:
    fn = functools.partial(shard_loss, model=model, norm=norm, train=False)
    loss, sums = mean_over_shards(fn, params, constants, (batch, real, _shard_weights(real), None), mesh)
    return {"loss": loss, **sums}


def evaluate(eval_fn, params, constants, split: SplitData, num_shards: int, mesh: Mesh, kind: str
             ) -> dict[str, float]:
    """Metrics of one full pass over a split (stored order)."""
    sums = [jax.device_get(eval_fn(params, constants, *sharding.global_batch((batch, real), mesh)))
            for batch, real, _ in split.steps(split.order(None, 0), num_shards)]
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
    """Fine-tunes from `init` ("scratch" or a checkpoint path), resuming from the newest checkpoint in
    `workdir`; returns the final metrics and paths.

    Matrix products follow `config.model.matmul_precision` (jax.default_matmul_precision).
    """
    with jax.default_matmul_precision(config.model.matmul_precision):
        return _finetune(config, workdir, init, init_ema)


def num_batch_shards(config: ml_collections.ConfigDict) -> int:
    """Shards per step: `data.num_batch_shards`, or one per device when 0; a multiple of the devices."""
    shards = config.data.num_batch_shards or jax.device_count()
    if shards % jax.device_count():
        raise ValueError(f"data.num_batch_shards={shards} must be a multiple of the {jax.device_count()} devices")
    return shards


class Progress:
    """The fine-tuning loop's host-side state, saved with each checkpoint (JSON): where the run is (epoch,
    records of the epoch's order consumed, steps taken) and what it has decided (plateau, early stopping,
    best epoch)."""

    FIELDS = ("epoch", "position", "batch", "iteration", "epoch_losses", "best_epoch", "best_val", "stopped")
    PLATEAU, TRACKER = ("best", "bad_epochs", "scale"), ("best", "epochs_since_best")

    def __init__(self, plateau: optim.PlateauScale, tracker: optim.MetricTracker):
        self.plateau, self.tracker = plateau, tracker
        self.epoch = self.position = self.batch = self.iteration = 0
        self.epoch_losses: list[float] = []   # float32 values, exact in JSON
        self.best_epoch, self.best_val, self.stopped = -1, {}, False

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in self.FIELDS},
                "plateau": {k: getattr(self.plateau, k) for k in self.PLATEAU},
                "tracker": {k: getattr(self.tracker, k) for k in self.TRACKER}}

    def load(self, saved: dict) -> None:
        for k in self.FIELDS:
            setattr(self, k, saved[k])
        for target, fields, name in ((self.plateau, self.PLATEAU, "plateau"), (self.tracker, self.TRACKER, "tracker")):
            for k in fields:
                setattr(target, k, saved[name][k])


def run_metadata(config: ml_collections.ConfigDict, backbone, norm: loss_lib.Normalization, init_path: str,
                 shards: int) -> dict:
    """What a checkpoint of this run must agree on to be resumed: model, task, normalisation, and what
    decides the steps (seed, batch size and shards, optimiser). JSON values (tuples as lists), as stored."""
    meta = {**orbax_io.make_metadata(backbone, 0, source=f"finetune:{init_path}", ema=False),
            "finetune": {"task": config.task.to_dict(), "normalization": dataclasses.asdict(norm)},
            "run": {"seed": config.seed, "batch_size": config.data.batch_size, "num_batch_shards": shards,
                    "optim": config.optim.to_dict()}}
    return json.loads(json.dumps(meta))


def _finetune(config: ml_collections.ConfigDict, workdir: str, init: str = "scratch", init_ema: bool = True
              ) -> dict[str, Any]:
    if not config.data.dir:
        raise ValueError("config.data.dir must name the folder with the prepared task shards (data_prep.build)")
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.fsdp)
    shards = num_batch_shards(config)
    spec, dspec = head_spec(config.task), data_spec(config)
    norm = normalization(config, config.data.dir)
    train = SplitData(config.data.dir, dspec, config.data.train_split, seed=config.seed,
                      num_workers=config.data.num_workers)
    val, test = (SplitData(config.data.dir, dspec, s, train.budgets, num_workers=config.data.num_workers)
                 for s in (config.data.val_split, config.data.test_split))

    backbone = backbone_for(backbone_config(config.model.backbone), spec)
    model = FinetuneModel(backbone, spec, dtype=jnp.dtype(config.model.dtype), execution=block_execution(config))
    variables = init_variables(model, config.seed, config.model.scale_factors, config.model.backbone)
    init_info = {"path": "scratch"}
    if init != "scratch":
        variables, init_info = weights.load_initial_variables(variables, init, backbone, use_ema=init_ema)
        print(f"initialised embedding + backbone from {init_info['path']} (ema={init_info['ema']}; "
              f"{len(init_info['dropped'])} stored leaves dropped)", file=sys.stderr)

    # Epoch-based schedule lengths in steps, as JMP converts them; a batch that closes early on a budget
    # makes an epoch a little longer than this.
    steps_per_epoch = math.ceil(len(train) / (config.data.batch_size * shards))
    ocfg = optim_config(config, backbone.num_blocks, steps_per_epoch)
    tx, schedules = optim.finetune_optimizer(variables["params"], ocfg, backbone.num_blocks)
    init_state = functools.partial(init_train_state, tx=tx, ema=False)
    state_shardings = sharding.state_shardings(jax.eval_shape(init_state, variables), mesh)
    state = jax.jit(init_state, out_shardings=state_shardings)(variables)
    # train_step's halves as two programs: the update compiles once, not once per batch shape. The store's
    # keys hold what each closes over: the configuration, the mesh, the data's normalisation and schedule.
    program_key = (config.to_json_best_effort(sort_keys=True), repr(mesh))
    step_fn = SplitStep(
        program_store.jit(functools.partial(train_loss_and_gradient, model=model, norm=norm, mesh=mesh),
                          name="finetune_gradient", key=(*program_key, norm),
                          out_shardings=(None, None, state_shardings.params)),
        program_store.jit(functools.partial(apply_gradient, tx=tx), name="finetune_update", key=(*program_key, ocfg),
                          out_shardings=(state_shardings, None), donate_argnums=0))
    eval_fn = program_store.jit(functools.partial(eval_step, model=model, norm=norm, mesh=mesh),
                                name="finetune_eval", key=(*program_key, norm))

    metric, mode = loss_lib.PRIMARY_METRIC[spec.kind]
    progress = Progress(optim.PlateauScale(config.optim.plateau_factor, config.optim.plateau_patience, mode),
                        optim.MetricTracker(mode, config.train.early_stopping_min_delta))
    metadata = run_metadata(config, backbone, norm, init_info["path"], shards)
    manager = checkpointing.make_manager(workdir, save_every=1, keep=config.train.keep_checkpoints)
    best_params = jax.device_get(state.params)
    restored = checkpointing.restore(manager, checkpointing.newest_intact(manager), state, metadata,
                                     arrays={"best_params": state.params})
    if restored is not None:
        state, saved, arrays = restored
        progress.load(saved)
        best_params = jax.device_get(arrays["best_params"])
        print(f"resumed from step {progress.iteration} (epoch {progress.epoch}) in {workdir}", file=sys.stderr)
    best_dir = os.path.join(os.path.abspath(workdir), "best")
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    best_manager = integrity.SealingCheckpointManager(best_dir, options=options)  # checksummed best steps
    log = MetricsLog(workdir, config.train.max_epochs * steps_per_epoch,
                     resume_step=int(state.step) if restored is not None else None)
    rng = jax.random.key(config.seed + 1)
    p = progress

    def save(force: bool) -> None:
        checkpointing.save(manager, p.iteration, state, p.to_json(), metadata, arrays={"best_params": best_params},
                           force=force)

    try:
        while not p.stopped and p.epoch < config.train.max_epochs:
            epoch, losses = p.epoch, list(p.epoch_losses)
            for batch, real, end in train.steps(train.order(epoch, config.seed), shards, start=p.position):
                if p.batch and p.iteration % config.train.checkpoint_every == 0:
                    p.epoch_losses = [float(x) for x in jax.device_get(losses)]
                    save(force=True)
                key = jax.random.fold_in(jax.random.fold_in(rng, epoch), p.batch)
                state, m = step_fn(state, *sharding.global_batch((batch, real), mesh), key,
                                   update_inputs=(jnp.float32(p.plateau.scale),))
                losses.append(m["loss"])
                p.position, p.batch, p.iteration = end, p.batch + 1, p.iteration + 1
            step = int(state.step)
            if int(state.nonfinite_in_a_row) >= p.batch:
                raise NonFiniteTrainingError(f"epoch {epoch}: every update had a non-finite loss or gradient "
                                             f"(last loss {float(losses[-1])}); see {log.path}")
            val_metrics = evaluate(eval_fn, state.params, state.constants, val, shards, mesh, spec.kind)
            lr = max(float(s(step)) for s in schedules.values()) * p.plateau.scale
            if step >= ocfg.total_steps:  # ReduceLROnPlateau only after the cosine phase, as JMP
                p.plateau.update(val_metrics[metric])
            improved = p.tracker.update(val_metrics[metric])
            if improved:
                best_params, p.best_epoch, p.best_val = jax.device_get(state.params), epoch, val_metrics
                orbax_io.save_step(best_manager, epoch, {"params": best_params, "constants": state.constants},
                                   metadata, force=True)
            train_loss = float(np.mean(np.asarray(jax.device_get(losses), np.float32)))
            log.write(step, {"epoch": epoch, "train/loss": train_loss, "lr": lr, "lr_scale": p.plateau.scale,
                             **{f"val/{k}": v for k, v in val_metrics.items()}})
            print(f"epoch {epoch} step {step} val {metric} {val_metrics[metric]:.6g}"
                  f"{' (best)' if improved else ''}", file=sys.stderr)
            p.stopped = (p.tracker.epochs_since_best >= config.train.early_stopping_patience
                         or lr < config.train.early_stopping_min_lr)
            p.epoch, p.position, p.batch, p.epoch_losses = epoch + 1, 0, 0, []
            save(force=True)
    finally:
        manager.wait_until_finished()
        best_manager.wait_until_finished()
        best_manager.close()
        log.close()
    test_metrics = evaluate(eval_fn, best_params, state.constants, test, shards, mesh, spec.kind)
    result = {"task": config.task.name, "init": init_info["path"], "epochs": p.epoch, "best_epoch": p.best_epoch,
              "primary_metric": metric, "val": p.best_val, "test": test_metrics,
              "best_checkpoint": os.path.join(best_dir, str(p.best_epoch)), "metrics": log.path}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
