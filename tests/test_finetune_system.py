"""System tests of `python -m experiments.finetune` on a tiny QM9-like split: 4 batch shards per step on one
and on four devices give the same results, and a run SIGKILLed mid-way then rerun ends with the results.json
of an uninterrupted run.

Every run is a real subprocess, as a user runs it, with the pre-training system tests' environment
(persistent XLA cache shared by the runs on the same device count).
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from test_finetune_run import molecule_records
from fixture_pretrain import REPO, run_command, subprocess_environ

from data_prep import shard_writer
from jmp_jax.models.config import demo

MAX_EPOCHS = 4
# 5 training structures, 1 per shard, 4 shards per step: 2 steps per epoch, the second with 3 padding shards.
SETTINGS = ("--config.task.source=tiny", "--config.task.cutoff=5.0", "--config.task.max_neighbors=12",
            "--config.data.batch_size=1", "--config.data.num_batch_shards=4", f"--config.train.max_epochs={MAX_EPOCHS}",
            "--config.train.checkpoint_every=1")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_system")
    data = str(root / "data")
    for split, n, seed in (("train", 5, 1), ("val", 3, 2), ("test", 3, 3)):
        shard_writer.write_split(molecule_records(n, seed), data, "tiny", split, units={}, source_files=[])
    # The demo model with one interaction block: the runs' time is mostly compiling, which grows with depth.
    backbone = root / "one_block.json"
    backbone.write_text(json.dumps(dataclasses.replace(demo(), num_blocks=1).to_dict()))
    return {"root": root, "data": data, "backbone": str(backbone), "environ": subprocess_environ()}


def command(env, workdir) -> list[str]:
    return [sys.executable, "-m", "experiments.finetune", "--config=configs/finetune/qm9.py:U_0,demo",
            f"--config.data.dir={env['data']}", f"--config.model.backbone={env['backbone']}", f"--workdir={workdir}",
            *SETTINGS]


def results(workdir) -> dict:
    """results.json with its paths relative to the workdir (runs in other workdirs compare equal)."""
    with open(os.path.join(workdir, "results.json")) as f:
        result = json.load(f)
    return {k: os.path.relpath(v, workdir) if k in ("best_checkpoint", "metrics") else v for k, v in result.items()}


def epoch_rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(env):
    workdir = env["root"] / "reference"
    run_command(command(env, workdir), env["environ"])
    return {"workdir": workdir, "results": results(workdir), "rows": epoch_rows(workdir)}


def test_run_trains_and_writes_results(reference):
    result, rows = reference["results"], reference["rows"]
    assert result["epochs"] == MAX_EPOCHS and [r["epoch"] for r in rows] == list(range(MAX_EPOCHS))
    assert [r["step"] for r in rows] == [2, 4, 6, 8]  # 2 steps per epoch of 4 shards
    assert all(np.isfinite(r["train/loss"]) for r in rows) and np.isfinite(result["test"]["mae"])
    assert result["best_checkpoint"] == os.path.join("best", str(result["best_epoch"]))


def test_four_devices_match_one_device(env, reference):
    workdir = env["root"] / "four_devices"
    run_command(command(env, workdir), env["environ"], devices=4)
    ours, theirs = results(workdir), reference["results"]
    assert (ours["epochs"], ours["best_epoch"]) == (theirs["epochs"], theirs["best_epoch"])
    # The same shards on 1 or 4 devices: only the order of the float32 sums over shards differs.
    for split in ("val", "test"):
        assert ours[split].keys() == theirs[split].keys()
        for key, value in theirs[split].items():
            np.testing.assert_allclose(ours[split][key], value, rtol=1e-4, err_msg=f"{split} {key}")
    np.testing.assert_allclose([r["train/loss"] for r in epoch_rows(workdir)],
                               [r["train/loss"] for r in reference["rows"]], rtol=1e-4)


def test_sigkill_then_rerun_ends_with_the_results_of_an_uninterrupted_run(env, reference):
    workdir = env["root"] / "killed"
    proc = subprocess.Popen(command(env, workdir), cwd=REPO, env=env["environ"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # epoch 1's validation is done; its checkpoint may or may not be written yet
        if line.startswith("epoch 1 step"):
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=600)
    assert not os.path.exists(workdir / "results.json")
    done = run_command(command(env, workdir), env["environ"])
    resumed = int(done.stderr.split("resumed from step ")[1].split()[0])
    assert 1 <= resumed < 2 * MAX_EPOCHS, done.stderr[-2000:]
    assert results(workdir) == reference["results"]
    assert epoch_rows(workdir) == reference["rows"]  # metrics of re-run epochs are not listed twice

