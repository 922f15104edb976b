"""Resuming `python -m experiments.pretrain` after faults: a damaged newest checkpoint, a deleted item,
another model config, SIGTERM, SIGKILL during a checkpoint save; and that a fresh run repeats its losses.

Reuses the pre-training system tests' tiny dataset, `:test` config and persistent XLA cache; every run is a
subprocess, as a user runs it, and the resumed runs must reproduce an uninterrupted run's losses exactly.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from fixture_pretrain import REPO, command, copy_of_finished, run, step_losses
from test_pretrain_system import NUM_STEPS

from jmp_jax.checkpoint import integrity


@pytest.fixture(scope="module")
def env(pretrain_env):
    """The pre-training runs' tiny dataset, built once for the session."""
    return pretrain_env


@pytest.fixture(scope="module")
def finished(finished_pretrain_run):
    """The uninterrupted run (shared with the system tests)."""
    return finished_pretrain_run


def metrics_steps(workdir) -> list[int]:
    """Steps of the training rows of metrics.jsonl, in file order."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [row["step"] for row in map(json.loads, f) if "loss" in row]


def assert_same_losses(workdir, reference: dict[int, float]) -> None:
    losses = step_losses(workdir)
    assert sorted(losses) == sorted(reference)
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [reference[s] for s in sorted(reference)],
                               rtol=1e-5)


def resumed_step(stderr: str) -> int:
    return int(stderr.split("resumed from step")[1].split()[0])


def skip_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("skipped checkpoint")]


def test_truncated_newest_checkpoint_falls_back_and_reproduces_the_run(env, finished):
    workdir = copy_of_finished(env, finished, "truncated")
    victim = max(glob.glob(str(workdir / "checkpoints" / str(NUM_STEPS) / "params" / "**" / "d" / "*"),
                           recursive=True), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    done = run(env, workdir)
    lines = skip_lines(done.stderr)
    assert len(lines) == 1 and f"step {NUM_STEPS} (" in lines[0] and "item 'params' file" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and resumed_step(done.stderr) == 4
    assert os.path.isdir(workdir / integrity.DAMAGED_DIR / str(NUM_STEPS) / "params")  # kept, not deleted
    assert metrics_steps(workdir) == list(range(1, NUM_STEPS + 1))  # re-run steps are not listed twice
    assert_same_losses(workdir, finished["losses"])


def test_deleted_metadata_item_falls_back_without_key_error(env, finished):
    workdir = copy_of_finished(env, finished, "no_metadata")
    shutil.rmtree(workdir / "checkpoints" / str(NUM_STEPS) / "metadata")
    done = run(env, workdir, "--config.train.num_steps=4")  # resuming is the probe: no steps to train
    lines = skip_lines(done.stderr)
    assert len(lines) == 1 and "item 'metadata' is missing" in lines[0], done.stderr
    assert "KeyError" not in done.stderr and resumed_step(done.stderr) == 4


def test_other_model_config_is_refused_before_the_data_set_up(env, finished, tmp_path):
    # A data folder that does not exist: had the data been set up first, that would be the error.
    cmd = command(env, finished["workdir"], "--config.model.backbone=jmp_s")
    cmd = [a for a in cmd if not a.startswith("--config.data.dir=")] + [f"--config.data.dir={tmp_path / 'none'}"]
    done = subprocess.run(cmd, cwd=REPO, env=env["environ"], capture_output=True, text=True, timeout=600)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"error: checkpoint step {NUM_STEPS} (") and "another configuration" in lines[0]
    assert "config.emb_size_atom" in lines[0] and "none" not in lines[0]


def read_until(stream, text: str) -> str:
    """Reads a child's stderr until `text` appears (the progress line ends in '\\r', not a newline)."""
    seen = ""
    while text not in seen:
        char = stream.read(1)
        assert char, f"the run ended before printing {text!r}: {seen[-3000:]}"
        seen += char
    return seen


@pytest.fixture(scope="module")
def terminated(env):
    """A fresh run sent SIGTERM once its step 2 is done."""
    workdir = env["root"] / "terminated"
    proc = subprocess.Popen(command(env, workdir), cwd=REPO, env=env["environ"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    read_until(proc.stderr, f" 2/{NUM_STEPS} loss")
    proc.send_signal(signal.SIGTERM)
    stderr = proc.stderr.read()
    proc.wait(timeout=600)
    return {"workdir": workdir, "returncode": proc.returncode, "stderr": stderr, "losses": step_losses(workdir)}


@pytest.fixture(scope="module")
def killed_in_save(env, terminated):
    """The terminated run restarted, then SIGKILLed while its step-4 checkpoint is being written."""
    workdir = terminated["workdir"]
    proc = subprocess.Popen(command(env, workdir), cwd=REPO, env=env["environ"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = read_until(proc.stderr, f" 4/{NUM_STEPS} loss")
    partial = str(workdir / "checkpoints" / "4.orbax-checkpoint-tmp*")
    while not glob.glob(partial):  # the save starts right after the progress line
        assert proc.poll() is None and not os.path.exists(workdir / "checkpoints" / "4"), "save ended unseen"
        time.sleep(0.005)  # a poll interval, not a wait for something to happen
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=600)
    assert glob.glob(partial) and not os.path.exists(workdir / "checkpoints" / "4")  # killed mid-save
    done = run(env, workdir)
    return {"workdir": workdir, "first_resume": resumed_step(seen), "stderr": done.stderr}


def test_sigterm_saves_the_current_step_and_exits(terminated, killed_in_save):
    lines = [line for line in terminated["stderr"].split("\r")[-1].splitlines() if line.strip()]
    assert terminated["returncode"] != 0 and lines[-1].startswith("error: stopped by SIGTERM after step "), lines
    step = int(lines[-1].split("after step ")[1].split(";")[0])
    assert step >= 2 and integrity.verify(str(terminated["workdir"] / "checkpoints" / str(step)))
    assert killed_in_save["first_resume"] == step  # the rerun starts where SIGTERM stopped


def test_same_seed_gives_same_losses(finished, terminated):
    """A fresh run of the same config computes the uninterrupted run's losses bit for bit."""
    assert len(terminated["losses"]) >= 2
    for step, loss in terminated["losses"].items():
        assert loss == finished["losses"][step], step


def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(finished, terminated, killed_in_save):
    workdir = killed_in_save["workdir"]
    assert resumed_step(killed_in_save["stderr"]) == killed_in_save["first_resume"]
    assert not glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*"))  # the partial save is gone
    assert metrics_steps(workdir) == list(range(1, NUM_STEPS + 1))
    assert_same_losses(workdir, finished["losses"])
