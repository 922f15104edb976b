"""Test utility: `python -m experiments.pretrain` on the tiny `:test` config as a real subprocess (as a user
runs it), the dataset for such runs (`pretrain_env`) and one uninterrupted run (`finished_pretrain_run`),
each made once for the whole test run (registered in conftest.py).
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def once_per_test_run(tmp_path_factory, name: str, make: Callable[[Path], None]) -> Path:
    """The folder `name`, filled by `make(folder)` once for the whole test run: the pytest-xdist workers (one
    session each) share it, the first to ask makes it and the others wait for it on a file lock. A folder
    that `make` failed to finish is made again by the next to ask."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # parent: this run's, all workers'
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            make(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def pretrain_env(tmp_path_factory):
    """One small default dataset for every pre-training run, and this session's folder for their workdirs."""
    pytest.importorskip("tblite")
    from data_prep import default_dataset
    data = once_per_test_run(tmp_path_factory, "pretrain_data", lambda folder: default_dataset.build_default_dataset(
        str(folder), sizes={"catalysis": 24, "molecules": 24, "reactions": 16}, progress=False))
    return {"root": tmp_path_factory.mktemp("pretrain"), "data": str(data), "environ": subprocess_environ()}


@pytest.fixture(scope="session")
def finished_pretrain_run(pretrain_env, tmp_path_factory):
    """The uninterrupted `:test` run, the reference of the system and resume tests: its workdir (to copy, never
    to change), stdout and losses."""
    def train(workdir):
        done = run(pretrain_env, workdir)
        (workdir.parent / f"{workdir.name}.stdout").write_text(done.stdout)

    workdir = once_per_test_run(tmp_path_factory, "finished_pretrain_run", train)
    return {"workdir": workdir, "stdout": (workdir.parent / f"{workdir.name}.stdout").read_text(),
            "losses": step_losses(workdir)}


def copy_of_finished(env, finished, name: str) -> Path:
    """A copy of the finished run's workdir, `name` in this session's folder, for a test that changes it."""
    workdir = env["root"] / name
    shutil.copytree(finished["workdir"], workdir)
    return workdir


def subprocess_environ() -> dict[str, str]:
    """The environment of the runs: CPU, and the suite's shared XLA cache (set in conftest)."""
    return dict(os.environ, JAX_PLATFORMS="cpu")


def command(env, workdir, *extra):
    return [sys.executable, "-m", "experiments.pretrain", "--config=configs/jmp_s.py:test",
            f"--config.data.dir={env['data']}", f"--workdir={workdir}", *extra]


def device_environ(environ: dict[str, str], devices: int) -> dict[str, str]:
    """`environ` with `devices` CPU devices per process."""
    environ = dict(environ)
    if devices > 1:
        environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return environ


def run(env, workdir, *extra, devices=1):
    return run_command(command(env, workdir, *extra), env["environ"], devices)


def run_command(cmd: list[str], environ: dict[str, str], devices: int = 1) -> subprocess.CompletedProcess:
    """Runs `cmd` from the repository root on `devices` CPU devices per process; asserts that it succeeds."""
    done = subprocess.run(cmd, cwd=REPO, env=device_environ(environ, devices), capture_output=True, text=True,
                          timeout=900)
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
