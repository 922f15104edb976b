"""System tests of `python -m experiments.pretrain` on the tiny `:test` config.

Every run is a real subprocess (as a user runs it); they share one small default dataset and a
persistent XLA compilation cache, so only the first run pays for compiling.
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("tblite")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ("catalysis", "molecules")
NUM_STEPS = 8  # the `:test` config's train.num_steps


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from data_prep import default_dataset
    root = tmp_path_factory.mktemp("pretrain")
    data = root / "data"
    default_dataset.build_default_dataset(str(data), sizes={"catalysis": 24, "molecules": 24, "reactions": 16},
                                          progress=False)
    environ = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    return {"root": root, "data": str(data), "environ": environ}


def command(env, workdir, *extra):
    return [sys.executable, "-m", "experiments.pretrain", "--config=configs/jmp_s.py:test",
            f"--config.data.dir={env['data']}", f"--workdir={workdir}", *extra]


def device_environ(env, devices: int) -> dict:
    """The runs' environment with `devices` CPU devices per process."""
    environ = dict(env["environ"])
    if devices > 1:
        environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return environ


def run(env, workdir, *extra, devices=1):
    done = subprocess.run(command(env, workdir, *extra), cwd=REPO, env=device_environ(env, devices),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def step_losses(workdir) -> dict[int, float]:
    """Loss of every step; a step logged twice (re-run after a restart) keeps its last value."""
    losses = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                losses[record["step"]] = record["loss"]
    return losses


def wait_for_checkpoint(workdir, step: int, procs) -> None:
    """Returns once orbax has committed checkpoint `step` of the run in `workdir` (its processes `procs`)."""
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / str(step) / "commit_success.txt").exists() and not (
            workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "run ended before its checkpoint"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def reference(env):
    workdir = env["root"] / "reference"
    done = run(env, workdir)
    return {"workdir": workdir, "stdout": done.stdout, "losses": step_losses(workdir)}


def test_training_lowers_every_task_loss_and_writes_outputs(reference):
    workdir = reference["workdir"]
    assert f"checkpoints: {workdir}/checkpoints" in reference["stdout"]
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert {"step", "loss", "lr"} <= set(train[0]) and len(train) == NUM_STEPS
    assert all(any(f"loss/{task}" in r for r in train) for task in TASKS)
    assert "fill/mixed/a2a" in train[0]  # the default: mixed-task batches
    validations = [r for r in records if "val/loss/catalysis" in r]
    assert [r["step"] for r in validations] == [0, NUM_STEPS]
    for task in TASKS:  # the same validation batches, before and after training
        assert validations[1][f"val/loss/{task}"] < validations[0][f"val/loss/{task}"], task
    assert os.listdir(workdir / "tensorboard")
    steps = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert steps[-1] == NUM_STEPS


def test_training_lowers_every_task_loss_and_writes_outputs_with_one_task_per_step(env):
    """The `data.task_mixing="step"` option: every step one task's batches, each task its own shapes."""
    workdir = env["root"] / "one_task_per_step"
    run(env, workdir, "--config.data.task_mixing=step")
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert len(train) == NUM_STEPS
    assert all(sum(f"loss/{task}" in r for task in TASKS) == 1 for r in train)  # one task per step
    assert {f"fill/{task}/a2a" for task in TASKS} <= set().union(*train)
    validations = [r for r in records if "val/loss/catalysis" in r]
    for task in TASKS:
        assert validations[1][f"val/loss/{task}"] < validations[0][f"val/loss/{task}"], task


def test_rerun_of_a_finished_workdir_resumes_and_stops(env, reference):
    done = run(env, reference["workdir"])
    assert f"resumed from step {NUM_STEPS}" in done.stderr


@pytest.fixture(scope="module")
def killed_run(env, reference):
    """A run SIGKILLed right after its step-4 checkpoint, then restarted in the same workdir."""
    workdir = env["root"] / "killed"
    proc = subprocess.Popen(command(env, workdir), cwd=REPO, env=env["environ"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_checkpoint(workdir, 4, [proc])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = step_losses(workdir)
    restarted = run(env, workdir)
    return {"before": before, "stderr": restarted.stderr, "losses": step_losses(workdir)}


def test_same_seed_gives_same_losses(reference, killed_run):
    before = killed_run["before"]
    assert len(before) >= 4
    for step, loss in before.items():
        assert loss == reference["losses"][step], step


def test_sigkill_then_restart_matches_uninterrupted_run(reference, killed_run):
    assert "resumed from step" in killed_run["stderr"]
    resumed_at = int(killed_run["stderr"].split("resumed from step")[1].split()[0])
    # At most the steps after the newest checkpoint were lost.
    assert resumed_at >= 4 and resumed_at >= max(killed_run["before"]) - 4
    assert sorted(killed_run["losses"]) == sorted(reference["losses"])
    for step, loss in reference["losses"].items():
        np.testing.assert_allclose(killed_run["losses"][step], loss, rtol=1e-5, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def four_devices(env):
    """Losses of the `:test` run on one process with 4 devices."""
    workdir = env["root"] / "four_devices"
    run(env, workdir, devices=4)
    return step_losses(workdir)


def assert_same_losses_on_other_devices(losses: dict, reference: dict) -> None:
    """The losses of a run on other devices (or processes) match the reference run's, step by step."""
    assert sorted(losses) == sorted(reference)
    # Per-device partial sums change the float32 summation order: the first steps agree to ~1e-7. With
    # gradient norms in the thousands early in training, Adam amplifies that, step by step (measured with
    # mixed-task batches: <= 2e-6 relative over the first 4 steps, 3e-4 at steps 5-6; one task per step
    # used to stay <= 8e-6 for 6 steps; up to 4e-2 by step 16 of longer runs), so later steps are compared
    # loosely.
    steps = sorted(losses)
    ours, theirs = [losses[s] for s in steps], [reference[s] for s in steps]
    np.testing.assert_allclose(ours[:4], theirs[:4], rtol=1e-4)
    np.testing.assert_allclose(ours, theirs, rtol=5e-2)


def test_four_devices_match_one_device(four_devices, reference):
    assert_same_losses_on_other_devices(four_devices, reference["losses"])


FSDP_PROBE = """
import jax, jax.numpy as jnp, optax
from jmp_jax.models import config as config_lib
from jmp_jax.models.jmp import JMPModel, placeholder_batch
from jmp_jax.training import optim, sharding
from jmp_jax.training.train_step import init_train_state
mesh = sharding.make_mesh(fsdp=4)
model = JMPModel(config_lib.demo(), num_tasks=2)
variables = jax.eval_shape(lambda: model.init(jax.random.key(0), placeholder_batch()))
tx, _ = optim.pretrain_optimizer(variables["params"], num_blocks=2, peak_lr=1e-3, warmup_steps=1, total_steps=2)
state = jax.eval_shape(lambda v: init_train_state(v, tx), variables)
shardings = sharding.state_shardings(state, mesh)
kernel = shardings.params["backbone"]["int_blocks_0"]["dense_ca"]["kernel"]
moment = shardings.opt_state[2][0].mu["backbone"]["int_blocks_0"]["dense_ca"]["kernel"]
x = jax.device_put(jnp.zeros((64, 64)), kernel)
print("SPEC", kernel.spec, moment.spec, x.addressable_shards[0].data.shape, len(x.devices()))
"""


def test_fsdp_axis_shards_parameters_and_optimizer_state(env):
    flags = f"{env['environ'].get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"
    environ = dict(env["environ"], XLA_FLAGS=flags)
    done = subprocess.run([sys.executable, "-c", FSDP_PROBE], cwd=REPO, env=environ, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("SPEC"))
    # Both the parameter and its Adam moment are split 4 ways: each device holds a quarter.
    assert line.count("'fsdp'") == 2 and line.endswith("(16, 64) 4"), line
