"""System tests of multi-process pre-training: `python -m experiments.pretrain` as 2 processes with 2 CPU devices
each, joined through `jax.distributed` on localhost (CPU collectives over gloo), as a cluster launch runs it.

The runs use `--config.mesh.fsdp=4`: every parameter is shared by the devices of both processes, and the batch
shards are split over all 4. One uninterrupted run is the reference: it matches the 1-process 4-device run
(the global batches do not depend on the process count), and a run that loses one process to SIGKILL and is
restarted matches it exactly.
"""
import signal
import socket
import subprocess

import numpy as np
import pytest

from fixture_pretrain import (REPO, assert_same_losses_on_other_devices, command, device_environ, step_losses,
                              wait_for_checkpoint)

pytest.importorskip("tblite")

PROCESSES, DEVICES_PER_PROCESS = 2, 2
FSDP_ACROSS_PROCESSES = "--config.mesh.fsdp=4"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(pretrain_env, workdir) -> list[tuple[subprocess.Popen, str]]:
    """Starts the run's processes; (process, path of its output) each."""
    address = f"127.0.0.1:{free_port()}"
    started = []
    for index in range(PROCESSES):
        environ = dict(device_environ(pretrain_env["environ"], DEVICES_PER_PROCESS), JAX_COORDINATOR_ADDRESS=address,
                       JAX_NUM_PROCESSES=str(PROCESSES), JAX_PROCESS_ID=str(index))
        log = f"{workdir}.process{index}.log"
        with open(log, "a") as out:
            started.append((subprocess.Popen(command(pretrain_env, workdir, FSDP_ACROSS_PROCESSES), cwd=REPO,
                                             env=environ, stdout=out, stderr=subprocess.STDOUT), log))
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
def two_processes(pretrain_env):
    workdir = pretrain_env["root"] / "two_processes"
    outputs = finish(launch(pretrain_env, workdir))
    return {"workdir": workdir, "outputs": outputs, "losses": step_losses(workdir)}


def test_two_processes_sharing_parameters_match_one_process_with_four_devices(two_processes, four_devices):
    assert all("finished at step 8" in out for out in two_processes["outputs"])
    assert_same_losses_on_other_devices(two_processes["losses"], four_devices)
    checkpoints = two_processes["workdir"] / "checkpoints"
    steps = sorted(int(path.name) for path in checkpoints.iterdir() if path.name.isdigit())
    assert steps[-1] == 8 and all((checkpoints / str(step) / "checksums.json").exists() for step in steps)


def test_sigkill_of_one_process_then_restart_of_both_matches_uninterrupted_run(pretrain_env, two_processes):
    workdir = pretrain_env["root"] / "killed"
    started = launch(pretrain_env, workdir)
    wait_for_checkpoint(workdir, 4, [proc for proc, _ in started])
    started[1][0].send_signal(signal.SIGKILL)
    # The other process cannot go on alone (its next collective fails or waits for the dead peer): the
    # scheduler of a real cluster ends the job, here the test does.
    try:
        started[0][0].wait(timeout=60)
    except subprocess.TimeoutExpired:
        started[0][0].send_signal(signal.SIGKILL)
        started[0][0].wait()
    outputs = finish(launch(pretrain_env, workdir))
    resumed = [int(out.split("resumed from step")[-1].split()[0]) for out in outputs]
    assert resumed[0] == resumed[1] >= 4
    losses = step_losses(workdir)
    assert sorted(losses) == sorted(two_processes["losses"])
    for step, loss in two_processes["losses"].items():
        np.testing.assert_allclose(losses[step], loss, rtol=1e-5, err_msg=f"step {step}")
