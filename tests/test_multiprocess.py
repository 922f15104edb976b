"""System tests of multi-process pre-training: `python -m experiments.pretrain` as 2 processes with 2 CPU devices
each, joined through `jax.distributed` on localhost (CPU collectives over gloo), as a cluster launch runs it.

One uninterrupted 2-process run is the reference of the others: it matches the 1-process 4-device run (the
global batches do not depend on the process count), a run that loses one process to SIGKILL and is restarted
matches it, and a run whose fsdp axis spans both processes matches the 4-device run too.
"""
import signal
import socket
import subprocess

import numpy as np
import pytest

from test_pretrain_system import (REPO, assert_same_losses_on_other_devices, command, device_environ, env,  # noqa: F401
                                  four_devices, step_losses, wait_for_checkpoint)

PROCESSES, DEVICES_PER_PROCESS = 2, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(env, workdir, *extra) -> list[tuple[subprocess.Popen, str]]:
    """Starts the run's processes; (process, path of its output) each."""
    address = f"127.0.0.1:{free_port()}"
    started = []
    for index in range(PROCESSES):
        environ = dict(device_environ(env, DEVICES_PER_PROCESS), JAX_COORDINATOR_ADDRESS=address,
                       JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(index))
        log = f"{workdir}.process{index}.log"
        with open(log, "a") as out:
            started.append((subprocess.Popen(command(env, workdir, *extra), cwd=REPO, env=environ, stdout=out,
                                             stderr=subprocess.STDOUT), log))
    return started


def finish(started) -> list[str]:
    """Waits for every process to succeed; their outputs."""
    outputs = []
    for proc, log in started:
        code = proc.wait(timeout=900)
        outputs.append(open(log).read())
        assert code == 0, outputs[-1][-3000:]
    return outputs


@pytest.fixture(scope="module")
def two_processes(env):
    workdir = env["root"] / "two_processes"
    outputs = finish(launch(env, workdir))
    return {"workdir": workdir, "outputs": outputs, "losses": step_losses(workdir)}


def test_two_processes_match_one_process_with_four_devices(two_processes, four_devices):
    assert all("finished at step 8" in out for out in two_processes["outputs"])
    assert_same_losses_on_other_devices(two_processes["losses"], four_devices)
    steps = sorted(int(s) for s in (two_processes["workdir"] / "checkpoints").iterdir() if s.name.isdigit())
    assert steps[-1] == 8 and all((two_processes["workdir"] / "checkpoints" / str(s) / "checksums.json").exists()
                                  for s in steps)


def test_sigkill_of_one_process_then_restart_of_both_matches_uninterrupted_run(env, two_processes):
    workdir = env["root"] / "killed"
    started = launch(env, workdir)
    wait_for_checkpoint(workdir, 4, [proc for proc, _ in started])
    started[1][0].send_signal(signal.SIGKILL)
    # The other process cannot go on alone (its next collective fails or waits for the dead peer): the
    # scheduler of a real cluster ends the job, here the test does.
    try:
        started[0][0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        started[0][0].send_signal(signal.SIGKILL)
        started[0][0].wait()
    outputs = finish(launch(env, workdir))
    resumed = [int(out.split("resumed from step")[1].split()[0]) for out in outputs]
    assert resumed[0] == resumed[1] >= 4
    losses = step_losses(workdir)
    assert sorted(losses) == sorted(two_processes["losses"])
    for step, loss in two_processes["losses"].items():
        np.testing.assert_allclose(losses[step], loss, rtol=1e-5, err_msg=f"step {step}")


def test_fsdp_axis_across_processes_matches_four_devices(env, four_devices):
    """Every parameter shared by the 4 devices of both processes; 3 steps (the warm-up: the same learning
    rates as the 8-step run's)."""
    workdir = env["root"] / "fsdp_across_processes"
    finish(launch(env, workdir, "--config.mesh.fsdp=4", "--config.train.num_steps=3"))
    assert_same_losses_on_other_devices(step_losses(workdir), {s: four_devices[s] for s in (1, 2, 3)})
