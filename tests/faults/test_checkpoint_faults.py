"""Faults in checkpoints on disk: bit flips, truncated and deleted items, retention after a fallback.

A tiny training state (a few arrays, Adam) goes through the same save / verify / restore code as a
pre-training run; `test_resume_faults.py` runs the real CLI.
"""
import glob
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmp_jax.checkpoint import integrity, orbax_io
from jmp_jax.models.config import demo
from jmp_jax.training import checkpointing
from jmp_jax.training.metrics_log import MetricsLog
from jmp_jax.training.state import init_train_state

METADATA = {"format": "test", "config": {"emb_size_atom": 8}, "tasks": [{"name": "a", "cutoff": 6.0}]}


def tiny_state(step: int):
    """A TrainState whose arrays all hold `step`, so a restore shows which step it came from."""
    variables = {"params": {"w": jnp.full((4, 3), float(step)), "b": jnp.full((3,), float(step))},
                 "constants": {"scale": jnp.full((2,), float(step))}}
    state = init_train_state(variables, optax.adam(1e-3))
    return state.replace(step=jnp.int32(step))


def save_steps(workdir, steps, keep=5):
    manager = checkpointing.make_manager(str(workdir), save_every=1, keep=keep)
    for step in steps:
        assert checkpointing.save(manager, step, tiny_state(step), {"position": step}, METADATA, force=True)
    manager.wait_until_finished()
    return manager


def resume(manager):
    """What the training loop does on start: the newest intact step, then its restore."""
    found = checkpointing.newest_intact(manager)
    return checkpointing.restore(manager, found, tiny_state(0), METADATA)


def largest_file(step_path, item):
    return max(glob.glob(os.path.join(step_path, item, "**", "d", "*"), recursive=True), key=os.path.getsize)


def assert_one_skip_line(capsys, step, causes):
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"skipped checkpoint step {step} (") and all(c in lines[0] for c in causes), lines[0]
    assert "Traceback" not in lines[0] and "tensorstore_spec" not in lines[0] and "damaged_checkpoints" in lines[0]


def test_a_killed_saves_temporary_folder_is_removed_before_the_manager_returns(tmp_path):
    """Synchronously: a run failing in set-up must not exit under orbax's clean-up thread (a traceback on exit)."""
    save_steps(tmp_path, [1])
    killed = os.path.join(tmp_path, "checkpoints", "2.orbax-checkpoint-tmp-1234")
    os.makedirs(os.path.join(killed, "params"))
    manager = checkpointing.make_manager(str(tmp_path), save_every=1, keep=5)
    assert not os.path.exists(killed)
    assert manager.all_steps() == [1]


def test_every_saved_step_gets_a_manifest_of_its_files(tmp_path):
    manager = save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        path = os.path.join(manager.directory, str(step))
        with open(os.path.join(path, integrity.MANIFEST)) as f:
            files = json.load(f)["files"]
        items = {rel.split(os.sep)[0] for rel in files}
        assert items == {"params", "ema_params", "constants", "opt_state", "counters", "pipeline", "metadata"}
        assert integrity.verify(path)
    manager.close()


def resume_after(tmp_path, capsys, damage) -> None:
    """Saves steps 1 and 2, damages step 2 (`damage(step_path)` returns the texts the skip line must hold) and
    resumes: from step 1, with one line naming step 2 and the cause."""
    manager = save_steps(tmp_path, [1, 2])
    causes = damage(os.path.join(manager.directory, "2"))
    capsys.readouterr()
    state, pipeline, _ = resume(manager)
    assert int(state.step) == 1 and pipeline == {"position": 1}
    np.testing.assert_array_equal(state.params["w"], np.ones((4, 3)))
    assert_one_skip_line(capsys, 2, causes)
    assert manager.all_steps() == [1]
    manager.close()


def test_truncated_newest_step_falls_back_to_previous_in_one_line(tmp_path, capsys):
    victim = {}

    def truncate(step_path):
        path = largest_file(step_path, "params")
        victim.update(inner=os.path.relpath(path, os.path.join(step_path, "params")), size=os.path.getsize(path))
        with open(path, "r+b") as f:
            f.truncate(victim["size"] // 2)
        return [f"item 'params' file '{victim['inner']}' has {victim['size'] // 2} bytes, {victim['size']} were saved"]

    resume_after(tmp_path, capsys, truncate)
    # Kept for inspection, out of the manager's reach.
    moved = os.path.join(tmp_path, integrity.DAMAGED_DIR, "2", "params", victim["inner"])
    assert os.path.getsize(moved) == victim["size"] // 2


def test_bit_flip_in_optimizer_state_falls_back(tmp_path, capsys):
    def flip(step_path):
        victim = largest_file(step_path, "opt_state")
        with open(victim, "r+b") as f:
            f.seek(os.path.getsize(victim) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0x10]))
        inner = os.path.relpath(victim, os.path.join(step_path, "opt_state"))
        return [f"item 'opt_state' file '{inner}' does not match its saved sha256"]

    resume_after(tmp_path, capsys, flip)


def test_deleted_metadata_item_falls_back_without_key_error(tmp_path, capsys):
    def delete_metadata(step_path):
        shutil.rmtree(os.path.join(step_path, "metadata"))
        return ["item 'metadata' is missing"]

    resume_after(tmp_path, capsys, delete_metadata)


def test_unsealed_step_that_does_not_restore_falls_back(tmp_path, capsys):
    """A step without a manifest (older code, or killed between orbax's commit and the manifest)."""
    def truncate_unsealed(step_path):
        os.remove(os.path.join(step_path, integrity.MANIFEST))
        victim = largest_file(step_path, "ema_params")
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        # The step and items are ours; the file is named by tensorstore's message, kept without its store spec.
        return ["items 'constants', 'counters', 'ema_params', 'opt_state', 'params', 'pipeline' cannot be read",
                victim]

    resume_after(tmp_path, capsys, truncate_unsealed)


def test_retention_after_a_fallback_neither_deletes_nor_trips_on_the_damaged_step(tmp_path, capsys):
    manager = save_steps(tmp_path, [1, 2, 3], keep=2)
    os.remove(largest_file(os.path.join(manager.directory, "3"), "params"))
    state, _, _ = resume(manager)
    assert int(state.step) == 2
    for step in (3, 4, 5, 6):  # the run goes on and saves the damaged step's number again
        assert checkpointing.save(manager, step, tiny_state(step), {"position": step}, METADATA, force=True)
    manager.wait_until_finished()
    assert manager.all_steps() == [5, 6]
    assert os.listdir(os.path.join(tmp_path, integrity.DAMAGED_DIR)) == ["3"]
    assert integrity.verify(os.path.join(manager.directory, "6"))
    manager.close()


def test_every_step_damaged_starts_afresh_and_keeps_them(tmp_path, capsys):
    manager = save_steps(tmp_path, [1, 2])
    for step in (1, 2):
        os.remove(largest_file(os.path.join(manager.directory, str(step)), "params"))
    capsys.readouterr()
    assert resume(manager) is None
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    assert sorted(os.listdir(os.path.join(tmp_path, integrity.DAMAGED_DIR))) == ["1", "2"]
    manager.close()


def test_other_configuration_is_one_line_naming_the_key(tmp_path):
    manager = save_steps(tmp_path, [1])
    found = checkpointing.newest_intact(manager)
    expected = {**METADATA, "config": {"emb_size_atom": 16}}
    with pytest.raises(ValueError) as info:
        checkpointing.check_metadata(manager, *found, expected)
    message = str(info.value)
    assert "\n" not in message and "config.emb_size_atom" in message and "checkpoint 8, this run 16" in message
    # Only the keys the caller knows are compared: a partial expectation (before the data set-up) passes.
    checkpointing.check_metadata(manager, *found, {"config": {"emb_size_atom": 8}, "tasks": [{"name": "a"}]})
    manager.close()


def corrupt_converter_output(tmp_path):
    meta = orbax_io.make_metadata(demo(), 2, "test", ema=False)
    variables = {"params": {"w": jnp.arange(1000.0)}, "constants": {"s": jnp.ones(2)}}
    step_path = orbax_io.save_variables(tmp_path / "ckpt", variables, meta, step=3)
    assert integrity.has_manifest(step_path)
    return step_path


def test_orbax_io_names_step_item_and_file_of_a_flipped_byte(tmp_path):
    step_path = corrupt_converter_output(tmp_path)
    victim = largest_file(step_path, "params")
    with open(victim, "r+b") as f:
        data = bytearray(f.read())
        data[len(data) // 2] ^= 0xFF
        f.seek(0)
        f.write(data)
    with pytest.raises(integrity.CheckpointDamagedError) as info:
        orbax_io.load_variables(tmp_path / "ckpt")
    message = str(info.value)
    assert message.startswith(f"checkpoint step 3 ({step_path}): item 'params' file 'ocdbt.process_0/d/")
    assert message.endswith("does not match its saved sha256") and "\n" not in message


def test_orbax_io_unsealed_damage_is_one_line_naming_the_items(tmp_path):
    step_path = corrupt_converter_output(tmp_path)
    os.remove(os.path.join(step_path, integrity.MANIFEST))
    victim = largest_file(step_path, "params")
    with open(victim, "r+b") as f:
        f.truncate(10)
    with pytest.raises(integrity.CheckpointDamagedError) as info:
        orbax_io.load_variables(tmp_path / "ckpt")
    message = str(info.value)
    assert message.startswith(f"checkpoint step 3 ({step_path}): items 'params', 'constants' cannot be read")
    assert "\n" not in message


def test_metrics_rows_of_rerun_steps_are_dropped(tmp_path):
    log = MetricsLog(str(tmp_path), 8, tensorboard=False)
    for step in range(6):
        log.write(step, {"loss": float(step)})
    log.close()
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')  # a row cut short by a kill
    log = MetricsLog(str(tmp_path), 8, resume_step=4, tensorboard=False)
    for step in (5, 6):
        log.write(step, {"loss": 10.0 + step})
    log.close()
    rows = [json.loads(line) for line in open(log.path)]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4, 5, 6] and rows[-1]["loss"] == 16.0
    MetricsLog(str(tmp_path), 8, tensorboard=False).close()  # a fresh run starts a fresh file
    assert open(log.path).read() == ""
