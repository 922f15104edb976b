"""The pre-training run: set-up, the jit-compiled sharded step (one for mixed-task batches, or one per task),
validation, checkpoints, metrics."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jmp_jax import program_store
from jmp_jax.checkpoint import orbax_io
from jmp_jax.data import budget_plan, task_data
from jmp_jax.data.process_exchange import ProcessExchange
from jmp_jax.models import config as config_lib
from jmp_jax.models.gemnet import BlockExecution
from jmp_jax.models.jmp import JMPModel
from jmp_jax.training import checkpointing, distributed, optim, sharding
from jmp_jax.training.metrics_log import MetricsLog
from jmp_jax.training.state import SplitStep, TrainState, init_train_state, init_variables
from jmp_jax.training.train_step import eval_step, train_loss_and_gradient, train_update


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates were skipped because the loss or gradient was not finite."""


class TrainingTerminated(RuntimeError):
    """SIGTERM stopped the run after it saved a checkpoint of the current step."""


@contextlib.contextmanager
def _sigterm_stops() -> Iterator[threading.Event]:
    """An event that SIGTERM (scheduler pre-emption) sets, so that the loop saves its step and stops.

    A handler can only be installed from the main thread; elsewhere SIGTERM keeps its default. The previous
    handler is back on exit.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event
    finally:
        signal.signal(signal.SIGTERM, previous)


def backbone_config(name: str) -> config_lib.BackboneConfig:
    if name in config_lib.NAMED_CONFIGS:
        return config_lib.NAMED_CONFIGS[name]()
    if os.path.exists(name):
        return config_lib.BackboneConfig.from_json(name)
    raise ValueError(f"model.backbone {name!r} is neither {sorted(config_lib.NAMED_CONFIGS)} nor a JSON file")


def block_execution(config: ml_collections.ConfigDict) -> BlockExecution:
    """How the backbone runs its blocks: `config.model.scan_blocks` and `config.model.remat` (defaults
    where a config predates them)."""
    return BlockExecution(scan=config.model.get("scan_blocks", False), remat=config.model.get("remat", "block"))


def run_metadata(config: ml_collections.ConfigDict, tasks: list[task_data.Task] | None = None) -> dict:
    """What a checkpoint must agree on to be resumed or loaded (model, tasks, normalisation).

    Same layout as the converter's, so `jmp_jax.load_pretrained` reads training checkpoints too. Without
    `tasks` (before the data set-up), the part the config alone determines: the model and the task settings.
    """
    meta = orbax_io.make_metadata(backbone_config(config.model.backbone), len(config.data.tasks), source="pretrain",
                                  ema=True)
    if tasks is None:
        return {**meta, "tasks": [{k: t[k] for k in ("name", "cutoff", "max_neighbors")} for t in config.data.tasks]}
    return {**meta, "tasks": [t.describe() for t in tasks]}


def _summarise(metrics: list[dict]) -> dict[str, float]:
    """Mean of every metric over steps; exact MAEs from the error sums."""
    out = {}
    stacked = {k: np.asarray([m[k] for m in metrics], np.float64) for k in metrics[0]}
    for k, v in stacked.items():
        if k.endswith(("_sum", "_count")):
            continue
        out[k] = float(v.mean())
    for kind in ("energy", "forces"):
        if f"{kind}_abs_sum" in stacked:
            out[f"{kind}_mae"] = float(stacked[f"{kind}_abs_sum"].sum() / max(stacked[f"{kind}_count"].sum(), 1))
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains until `config.train.num_steps`, resuming from the newest checkpoint in `workdir`.

    Matrix products follow `config.model.matmul_precision` (jax.default_matmul_precision).
    """
    with jax.default_matmul_precision(config.model.matmul_precision):
        return _train(config, workdir)


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    distributed.initialize()
    os.makedirs(workdir, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.fsdp)
    if config.data.num_batch_shards % jax.device_count():
        raise ValueError(f"data.num_batch_shards={config.data.num_batch_shards} must be a multiple of the "
                         f"{jax.device_count()} devices")
    # Each process packs the batch shards its devices hold and agrees on each step's shape with the others.
    lanes = sharding.local_batch_rows(mesh, config.data.num_batch_shards)
    exchange = ProcessExchange.for_run("jmp_jax.pretrain")
    manager = checkpointing.make_manager(workdir, save_every=config.log.checkpoint_every,
                                         keep=config.log.keep_checkpoints)
    found = checkpointing.newest_intact(manager)
    if found is not None:  # refuse another configuration before minutes of data and model set-up
        checkpointing.check_metadata(manager, *found, run_metadata(config))
    tasks = task_data.load_tasks(config)
    train_pipe = task_data.make_pipeline(config, tasks, split="train", training=True, lanes=lanes,
                                         exchange=exchange)
    metadata = run_metadata(config, tasks)

    backbone = backbone_config(config.model.backbone)
    model = JMPModel(backbone, num_tasks=len(tasks), dtype=jnp.dtype(config.model.dtype),
                     execution=block_execution(config))
    variables = init_variables(model, config.seed, config.model.scale_factors, config.model.backbone)
    tx, schedule = optim.pretrain_optimizer(
        variables["params"], num_blocks=backbone.num_blocks, peak_lr=config.train.lr,
        warmup_steps=config.train.warmup_steps, total_steps=config.train.num_steps, b1=config.train.b1,
        b2=config.train.b2, weight_decay=config.train.weight_decay, clip_norm=config.train.clip_norm,
        warmup_start_factor=config.train.warmup_start_factor, min_lr_factor=config.train.min_lr_factor)
    distributed.barrier("set-up")
    abstract_state = jax.eval_shape(functools.partial(init_train_state, tx=tx), variables)
    state_shardings = sharding.state_shardings(abstract_state, mesh)
    state = jax.jit(functools.partial(init_train_state, tx=tx), out_shardings=state_shardings)(variables)

    restored = checkpointing.restore(manager, found, state, metadata)
    if restored is not None:
        state, pipeline_state, _ = restored
        train_pipe.restore(pipeline_state)
        print(f"resumed from step {int(state.step)} in {workdir}", file=sys.stderr)

    distributed.barrier("restored")
    batch_sharding = sharding.batch_sharding(mesh)
    steps: dict[int, Any] = {}
    evals: dict[int, Any] = {}

    def norm_of(task: int | None):
        """One task's scales, or every task's for mixed-task batches (task None)."""
        return tasks[task].normalization if task is not None else tuple(t.normalization for t in tasks)

    replicated = sharding.replicated(mesh)
    # What the step programs close over, for the traced-program store: the configuration and the mesh here,
    # each task's normalisation (from its data) below.
    program_key = (config.to_json_best_effort(sort_keys=True), repr(mesh))
    update = program_store.jit(
        functools.partial(train_update, tx=tx, schedule=schedule, ema_decay=config.train.ema_decay),
        name="pretrain_update", key=program_key, in_shardings=(state_shardings, replicated, state_shardings.params),
        out_shardings=(state_shardings, replicated), donate_argnums=0)

    def step_fn(task: int | None):
        if task not in steps:
            gradient = functools.partial(train_loss_and_gradient, model=model, task=task, norm=norm_of(task),
                                         mesh=mesh)
            steps[task] = SplitStep(
                program_store.jit(gradient, name="pretrain_gradient", key=(*program_key, task, norm_of(task)),
                                  in_shardings=(state_shardings.params, state_shardings.constants, batch_sharding),
                                  out_shardings=(replicated, replicated, state_shardings.params)),
                update)
        return steps[task]

    def eval_fn(task: int | None):
        if task not in evals:
            fn = functools.partial(eval_step, model=model, task=task, norm=norm_of(task), mesh=mesh)
            evals[task] = program_store.jit(fn, name="pretrain_eval", key=(*program_key, task, norm_of(task)))
        return evals[task]

    step = int(state.step)
    log = MetricsLog(workdir, config.train.num_steps, resume_step=step if restored is not None else None,
                     files=jax.process_index() == 0)
    validate = Validation(config, tasks, lanes=lanes, exchange=exchange)
    window: list[tuple[int, dict]] = []
    structures = atoms = 0
    window_start = time.time()
    last_loss = None  # until the first logged window
    if step == 0:  # the baseline that later validations are compared with
        log.write(0, validate(state, eval_fn, mesh))
    with _sigterm_stops() as terminated:
        try:
            while step < config.train.num_steps:
                task, host_batch = next(train_pipe)
                state, metrics = step_fn(task)(state, sharding.global_batch(host_batch, mesh))
                window.append((task, metrics))
                structures += int(host_batch.graphs.graph.globals["mask"].sum())
                atoms += int(host_batch.graphs.graph.nodes["mask"].sum())
                if int(state.nonfinite_in_a_row) >= config.train.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"stopped at step {int(state.step)}: {int(state.nonfinite_in_a_row)} consecutive updates had "
                        f"a non-finite loss or gradient (last task {batch_name(task, tasks)!r}); see {log.path}")
                step = int(state.step)
                if len(window) >= config.log.every:
                    elapsed = time.time() - window_start
                    scalars = window_scalars(window, tasks)
                    scalars.update(structures_per_s=structures / elapsed, atoms_per_s=atoms / elapsed,
                                   **budget_plan.fill_ratios(host_batch, batch_name(task, tasks)))
                    log.write(step, scalars)
                    last_loss = scalars["loss"]
                    window, structures, atoms, window_start = [], 0, 0, time.time()
                log.progress(step, last_loss)
                if step % config.log.eval_every == 0 or step == config.train.num_steps:
                    log.write(step, validate(state, eval_fn, mesh))
                stop = stop_requested(terminated, step, exchange)
                checkpointing.save(manager, step, state, train_pipe.state(), metadata,
                                   force=step == config.train.num_steps or stop, exchange=exchange)
                if stop and step < config.train.num_steps:
                    raise TrainingTerminated(f"stopped by SIGTERM after step {step}; saved checkpoint step {step} in "
                                             f"{manager.directory}: rerun with the same workdir to resume")
        except KeyboardInterrupt:
            checkpointing.save(manager, step, state, train_pipe.state(), metadata, force=True, exchange=exchange)
            print(f"\ninterrupted: saved step {step} in {manager.directory}", file=sys.stderr)
            raise
        finally:
            manager.wait_until_finished()
            train_pipe.close()
            log.close()
    return {"step": step, "workdir": os.path.abspath(workdir), "metrics": log.path,
            "checkpoints": str(manager.directory)}


def stop_requested(terminated: threading.Event, step: int, exchange: ProcessExchange | None) -> bool:
    """SIGTERM's flag, read once per step (it may arrive between the save and the check). Under
    `jax.distributed` the processes stop together, at the first step where any of them has the flag: a save
    is a collective of all of them."""
    if exchange is None:
        return terminated.is_set()
    flags = exchange.allgather(f"stop/{step}", terminated.is_set())
    exchange.delete_mine(f"stop/{step - 2}/")  # every process has read them: it has reached this step
    return any(flags)


def batch_name(task: int | None, tasks: list[task_data.Task]) -> str:
    """The task of a single-task batch, or "mixed"."""
    return "mixed" if task is None else tasks[task].name


def window_scalars(window: list[tuple[int | None, dict]], tasks: list[task_data.Task]) -> dict[str, float]:
    """Loss, learning rate, gradient norm and skipped updates over the window; loss and MAEs per task
    (from the per-task sums of mixed-task batches, or the single-task batches of each task)."""
    window = jax.device_get(window)
    summary = _summarise([m for _, m in window])
    scalars = {k: summary[k] for k in ("loss", "lr", "grad_norm")}
    scalars["nonfinite_skipped"] = float(sum(1 - float(m["finite"]) for _, m in window))
    mixed = [m for k, m in window if k is None]
    if mixed:
        sums = {k: np.sum([m[k] for m in mixed], axis=0) for k in mixed[0] if k.endswith(("_sum", "_count"))}
        for t, task in enumerate(tasks):
            if sums["task_loss_count"][t]:
                scalars[f"loss/{task.name}"] = sums["task_loss_sum"][t] / sums["task_loss_count"][t]
                for kind in ("energy", "forces"):
                    scalars[f"{kind}_mae/{task.name}"] = sums[f"{kind}_abs_sum"][t] / max(sums[f"{kind}_count"][t], 1)
    for t, task in enumerate(tasks):
        per_task = [m for k, m in window if k == t]
        if per_task:
            s = _summarise(per_task)
            scalars.update({f"loss/{task.name}": s["loss"], f"energy_mae/{task.name}": s["energy_mae"],
                            f"forces_mae/{task.name}": s["forces_mae"]})
    return {k: float(v) for k, v in scalars.items()}


class Validation:
    """Each task's validation pipeline, opened once and rewound to its start at every evaluation: each one
    sees the same batches, without reopening the split or starting new worker threads."""

    def __init__(self, config: ml_collections.ConfigDict, tasks: list[task_data.Task], *,
                 lanes: list[int] | None = None, exchange: ProcessExchange | None = None):
        self.tasks, self.eval_batches = tasks, config.log.eval_batches
        self.pipes = [task_data.make_pipeline(config, tasks, split=config.data.val_split, training=False, only_task=t,
                                              lanes=lanes, exchange=exchange)
                      for t in range(len(tasks))]
        self.starts = [pipe.state() for pipe in self.pipes]

    def __call__(self, state: TrainState, eval_fn, mesh) -> dict[str, float]:
        """Loss and MAEs of the EMA parameters on each task's validation split."""
        out = {}
        for t, (task, pipe, start) in enumerate(zip(self.tasks, self.pipes, self.starts)):
            pipe.restore(start)
            metrics = []
            for _ in range(self.eval_batches):
                batch_task, host_batch = next(pipe)
                step = eval_fn(None if batch_task is None else t)  # mixed-task batches compile one eval step
                metrics.append(step(state.ema_params, state.constants, sharding.global_batch(host_batch, mesh)))
            pipe.close()  # its prefetch thread stops until the next evaluation
            summary = _summarise(jax.device_get(metrics))
            out.update({f"val/loss/{task.name}": summary["loss"], f"val/energy_mae/{task.name}": summary["energy_mae"],
                        f"val/forces_mae/{task.name}": summary["forces_mae"]})
        return out
