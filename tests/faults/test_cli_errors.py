"""Every command-line entry point fails with one line `error: <cause>` naming the file, a non-zero exit and
no start-up banner; JMP_JAX_TRACEBACK=1 brings the traceback back."""
import glob
import os
import subprocess
import sys

import jax.numpy as jnp

from jmp_jax import cli
from jmp_jax.checkpoint import orbax_io
from jmp_jax.models.config import demo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(module, *args, **environ):
    env = {k: v for k, v in os.environ.items() if k != cli.TRACEBACK_ENV}
    env.update(JAX_PLATFORMS="cpu", **environ)
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_line_error(done, *names):
    """Exactly one stderr line (so no TensorFlow / absl / orbax banner either), naming every `names`."""
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: ") and all(str(n) in lines[0] for n in names), lines[0]


def test_pretrain_missing_data(tmp_path):
    done = run_cli("experiments.pretrain", "--config=configs/jmp_s.py:test", f"--config.data.dir={tmp_path / 'none'}",
                   f"--workdir={tmp_path / 'run'}")
    assert_one_line_error(done, tmp_path / "none" / "catalysis-train.metadata.json")


def test_finetune_missing_data(tmp_path):
    done = run_cli("experiments.finetune", "--config=configs/finetune/rmd17.py:ethanol,demo",
                   f"--config.data.dir={tmp_path / 'none'}", f"--workdir={tmp_path / 'run'}")
    assert_one_line_error(done, tmp_path / "none" / "rmd17_ethanol-train.metadata.json")


def test_evaluate_flipped_checkpoint_byte_names_step_item_and_file(tmp_path):
    variables = {"params": {"w": jnp.arange(256.0)}, "constants": {}}
    step_path = orbax_io.save_variables(tmp_path / "ckpt", variables, orbax_io.make_metadata(demo(), 1, "t", False))
    victim = max(glob.glob(os.path.join(step_path, "params", "**", "d", "*"), recursive=True), key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.seek(40)
        byte = f.read(1)
        f.seek(40)
        f.write(bytes([byte[0] ^ 1]))
    done = run_cli("experiments.evaluate", "--checkpoint", tmp_path / "ckpt", "--data", tmp_path, "--source", "x",
                   "--output", tmp_path / "eval")
    inner = os.path.relpath(victim, os.path.join(step_path, "params"))
    assert_one_line_error(done, f"checkpoint step 0 ({step_path}): item 'params' file '{inner}'", "sha256")


def test_embeddings_missing_checkpoint(tmp_path):
    done = run_cli("experiments.embeddings", "--checkpoint", tmp_path / "none", "--data", f"{tmp_path}:x:val")
    assert_one_line_error(done, tmp_path / "none")


def test_build_missing_input(tmp_path):
    done = run_cli("data_prep.build", "--source", "rmd17", "--input", tmp_path / "rmd17_x.npz", "--output", tmp_path)
    assert_one_line_error(done, tmp_path / "rmd17_x.npz")


def test_default_dataset_bad_seed(tmp_path):
    done = run_cli("data_prep.default_dataset", "--small", "--seed", "-1", "--output", tmp_path)
    assert_one_line_error(done, "non-negative")


def test_convert_damaged_checkpoint(tmp_path):
    (tmp_path / "jmp.pt").write_bytes(b"PK\x03\x04 cut short")
    done = run_cli("jmp_jax.convert", "--checkpoint", tmp_path / "jmp.pt", "--output", tmp_path / "out")
    assert_one_line_error(done, tmp_path / "jmp.pt")


def test_traceback_on_request(tmp_path):
    done = run_cli("experiments.evaluate", "--checkpoint", tmp_path / "none", "--data", tmp_path, "--source", "x",
                   **{cli.TRACEBACK_ENV: "1"})
    assert done.returncode != 0 and "Traceback (most recent call last)" in done.stderr
    assert f"CheckpointMismatchError: no checkpoint directory at {tmp_path / 'none'}" in done.stderr


def test_one_line_keeps_every_line_of_a_multi_line_message():
    err = ValueError("checkpoint from another config:\n  a: 1, expected 2\n  b: 3, expected 4")
    assert cli.one_line(err) == "checkpoint from another config: a: 1, expected 2; b: 3, expected 4"
    assert cli.one_line(KeyError("metadata")) == "KeyError: 'metadata'"
