"""Every documented user path, run from a clean copy of the repository as a user runs it: each ```bash block
of README.md and each notebook in notebooks/, installed the way they say.

Clean copy: this checkout's tracked files (their working-tree contents) committed to a fresh git repository;
no untracked or ignored file comes along (no .venv, no workdir/, nothing beside the checkout).
Install: the README's `python3 -m venv .venv && . .venv/bin/activate && pip install -e .` and the notebooks'
own `pip install "jmp_jax @ git+REPO_URL"` cell, as written. So that nothing is downloaded, pip runs with
PIP_NO_INDEX=1 and PIP_NO_BUILD_ISOLATION=0 (setuptools from the environment), and each new venv sees this
interpreter's site-packages through a .pth file: the pinned dependencies are there, pip installs the project.
Scale: tiny, by flags appended to the commands (`TINY_FLAGS`; absl and argparse keep the last value of a flag)
and by small inputs written where the README names files a user brings (`user_inputs`).
Shared work: the blocks run in README order in one copy, each distinct command once, later commands using what
earlier ones wrote (as a user's shell would); the notebooks load the README's demo pre-training checkpoint.
"""
from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import signal
import site
import subprocess
import sys
import time

import numpy as np
import pytest

from fixture_files import reference_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND_TIMEOUT_S = 900
CELL_TIMEOUT_S = 600

# Appended to every command that starts with the key. Pre-training: 2 steps of the demo model on the small
# default dataset, a checkpoint and a validation at step 2. Fine-tuning: one epoch of the demo model
# (the README's jmp_s run starts from the JMP-S-shaped fixture checkpoint, which is demo-sized).
TINY_PRETRAIN = ("--config.train.num_steps=2 --config.train.warmup_steps=1 --config.train.lr=1e-3 --config.log.every=1 "
                 "--config.log.eval_every=2 --config.log.eval_batches=1 --config.log.checkpoint_every=2 "
                 "--config.data.structures_per_batch=2 --config.model.backbone=demo "
                 "--config.model.scale_factors=none --config.data.default_dataset_size=small")
TINY_FLAGS = {
    "python -m experiments.pretrain --config=configs/jmp_s.py:test": "",  # the system tests' config: tiny already
    "python -m experiments.pretrain": TINY_PRETRAIN,
    "python -m experiments.finetune": "--config.train.max_epochs=1 --config.model.backbone=demo "
                                      "--config.model.scale_factors=none "
                                      "'--config.optim.block_multipliers=()'",
    "python -m data_prep.build --source qm9": "--max-records 8",
    # The rMD17 sample's splits (1,000 frames each) cut to 8 train, 8 val and 8 test frames.
    "python -m data_prep.build --source rmd17 --input tests/fixtures/public_data/rmd17/rmd17_ethanol_${split}":
        "--max-records 8",
}
# Placeholders the README asks the user to replace, and the value the test gives them.
PLACEHOLDERS = {"DATA": "jmp_data"}
# Lines no test can run here, with the reason (reported by the test that skips them).
NOT_RUNNABLE = {"--runner FlinkRunner": "needs a Flink cluster", "srun ": "needs a SLURM cluster",
                "gcloud compute tpus": "needs a Cloud TPU pod"}
# The README's test command runs the whole suite, around this test: inside it, it runs these files only.
SUITE_FILES_RUN = ("test_lint.py", "test_skip_policy.py")


def suite_selection(copy: str) -> str:
    """PYTEST_ADDOPTS for the README's test command: every other test file of the copy ignored."""
    tests = os.path.join(copy, "tests")
    ignored = [f"--ignore=tests/{name}" for name in sorted(os.listdir(tests))
               if (name.startswith("test_") or os.path.isdir(os.path.join(tests, name))) and name not in SUITE_FILES_RUN
               and name != "fixtures" and not name.startswith("__")]
    return " ".join(["-p no:cacheprovider"] + ignored)


def readme_commands() -> list[list[str]]:
    """The ```bash blocks of README.md, each as its command lines (continuations joined, comments dropped)."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), flags=re.S | re.M)
    commands = []
    for block in blocks:
        lines = [line.strip() for line in block.replace("\\\n", " ").splitlines()]
        commands.append([re.sub(r"\s+", " ", line) for line in lines if line and not line.startswith("#")])
    return commands


def tiny(command: str) -> str:
    """The command at tiny scale: its comment dropped, placeholders filled, TINY_FLAGS appended to each simple
    command of the line (the parts between `&&`, `&`, `;`, `do`) that starts with a key after its environment
    assignments."""
    command = re.sub(r"\s+#.*$", "", command)
    for name, value in PLACEHOLDERS.items():
        command = re.sub(rf"\b{name}\b", value, command)
    parts = re.split(r"(\s*&&\s*|\s*&\s+|\s*;\s*(?:do\s+)?)", command)
    for i in range(0, len(parts), 2):
        program = re.sub(r'^(?:[A-Z_]+=(?:"[^"]*"|\S+)\s+)*', "", parts[i])
        flags = next((f for prefix, f in TINY_FLAGS.items() if program.startswith(prefix)), None)
        parts[i] = f"{parts[i]} {flags}" if flags else parts[i]
    return "".join(parts)


def clean_copy(destination) -> str:
    """The tracked files of this checkout, as in its working tree, committed to a new git repository."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if os.path.exists(os.path.join(REPO, name)):
            os.makedirs(os.path.join(destination, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(destination, name))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "clean copy"]):
        subprocess.run(git + args, cwd=destination, check=True)
    return str(destination)


def seeded_venv(path, with_pip: bool = False) -> str:
    """A venv made by the base interpreter whose .pth file adds this interpreter's site-packages, so pip finds
    the pinned dependencies installed. with_pip: its own pip (ensurepip's, installed before the seed, which
    would hide it), else this interpreter's pip."""
    subprocess.run([sys._base_executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(path)],
                   check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    if with_pip:  # ensurepip's setuptools would hide the pinned environment's (torch needs a newer one)
        subprocess.run([os.path.join(path, "bin", "python"), "-m", "pip", "uninstall", "-q", "-y", "setuptools"],
                       check=True, env={**os.environ, "PIP_CONFIG_FILE": os.devnull})
    purelib = subprocess.run([os.path.join(path, "bin", "python"), "-c", "import sysconfig; "
                              "print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with open(os.path.join(purelib, "_test_parent_environment.pth"), "w") as f:
        f.write("\n".join(site.getsitepackages()) + "\n")
    return os.path.join(path, "bin", "python")


def user_environment(root, venv: str | None) -> dict:
    """A user's shell: `python3` the base interpreter, the venv activated (if any), pip offline, JAX on CPU with
    a persistent compile cache shared by every command, the default dataset cached under root; nothing
    from the test run's PYTHONPATH (the copy's code must be the one that runs)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTEST_ADDOPTS") and not k.startswith("PIP_")}
    shims = os.path.join(root, "shims")
    if not os.path.exists(shims):  # a script, not a link: venv takes a link's folder for the Python home
        os.makedirs(shims)
        with open(os.path.join(shims, "python3"), "w") as f:
            f.write(f'#!/bin/sh\nexec "{os.path.realpath(sys._base_executable)}" "$@"\n')
        os.chmod(os.path.join(shims, "python3"), 0o755)
    path = [shims] + ([os.path.join(venv, "bin")] if venv else []) + [env["PATH"]]
    # No pip configuration of this machine (local wheel folders, other indexes): pip installs the project only.
    env.update(PATH=os.pathsep.join(path), PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_CONFIG_FILE=os.devnull,
               PIP_DISABLE_PIP_VERSION_CHECK="1", JAX_PLATFORMS="cpu",  # XLA cache: the suite's (conftest)
               JMP_JAX_DATA=os.path.join(root, "jmp_jax_cache"),
               TF_CPP_MIN_LOG_LEVEL="2")
    if venv:
        env["VIRTUAL_ENV"] = venv
    return env


def run_command(command: str, cwd: str, env: dict) -> tuple[int, str, float]:
    """Runs one command line with bash in its own process group (all of it killed on timeout):
    (exit status, output, seconds)."""
    start = time.monotonic()
    process = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output = process.communicate()[0] + f"\n[killed after {COMMAND_TIMEOUT_S} s]"
    return process.returncode, output, round(time.monotonic() - start, 1)


def rmd17_npz(path: str, num_frames: int, seed: int) -> None:
    """A stand-in for an rMD17 ethanol split file (the andersx/rmd17-npz layout): rattled ethanol frames,
    energies and forces in kcal/mol(/Å)."""
    from ase.build import molecule
    atoms = molecule("CH3CH2OH")
    rng = np.random.default_rng(seed)
    coords = atoms.positions + rng.normal(scale=0.05, size=(num_frames, len(atoms), 3))
    np.savez(path, nuclear_charges=atoms.numbers, coords=coords, energies=rng.normal(-97000.0, 2.0, num_frames),
             forces=rng.normal(scale=20.0, size=(num_frames, len(atoms), 3)))


def user_inputs(copy: str) -> None:
    """What the README asks the user to bring: the released JMP-S file (the reference fixture checkpoint, a
    JMP-shaped Lightning checkpoint of the demo size) and rMD17 ethanol files (train: 2 train + 50 val frames)."""
    shutil.copy(reference_path("jmp_style_checkpoint.pt"), os.path.join(copy, "jmp-s.pt"))
    os.makedirs(os.path.join(copy, "rmd17"))
    rmd17_npz(os.path.join(copy, "rmd17", "rmd17_ethanol_train_01.npz"), 52, 0)
    rmd17_npz(os.path.join(copy, "rmd17", "rmd17_ethanol_test_01.npz"), 2, 1)
    rmd17_npz(os.path.join(copy, "rmd17_ethanol.npz"), 1001, 2)  # JMP's split: 950 / 50 / the rest


def jmp_data_from_default(copy: str, default_dir: str) -> None:
    """DATA for the `:jmp` config: the four JMP sources' train/val splits, the first 4 records of a default-
    dataset domain's split each (catalysis stands in for OC20, whose energies are referenced, and OC22;
    molecules for ANI-1x; reactions for Transition-1x), written with data_prep.shard_writer."""
    env = user_environment(os.path.dirname(copy), None)
    script = (
        "import sys\nfrom data_prep import shard_writer\nfrom jmp_jax.data import task_data\n"
        "default, out = sys.argv[1:]\n"
        "for name, domain, kind in (('oc20', 'catalysis', 'referenced'), ('oc22', 'catalysis', 'total'),"
        " ('ani1x', 'molecules', 'total'), ('transition1x', 'reactions', 'total')):\n"
        "    for split in ('train', 'val'):\n"
        "        source = task_data.open_source(default, domain, split)\n"
        "        shard_writer.write_split((source[i] for i in range(min(4, len(source)))), out, name, split, units={},"
        " source_files=[],"
        " energy_kind=kind)\n")
    result = subprocess.run([os.path.join(copy, ".venv", "bin", "python"), "-c", script, default_dir,
                             os.path.join(copy, PLACEHOLDERS["DATA"])], cwd=copy, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert result.returncode == 0, f"writing DATA failed:\n{result.stdout[-4000:]}"


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """Every runnable README command at tiny scale, in order, in one clean copy: (copy, {command: (exit
    status, output, seconds)}, {command not run: reason}). A failed command does not stop the later ones."""
    root = tmp_path_factory.mktemp("readme")
    copy = clean_copy(root / "jmp_jax")
    user_inputs(copy)
    # The README's own first line makes .venv; made and seeded first, its `python3 -m venv .venv` keeps both.
    seeded_venv(os.path.join(copy, ".venv"), with_pip=True)
    runs, not_run = {}, {}
    for block in readme_commands():
        for command in block:
            reason = next((why for marker, why in NOT_RUNNABLE.items() if marker in command), None)
            if reason:
                not_run[command] = reason
                continue
            cached = os.path.join(str(root), "jmp_jax_cache")
            if " --config=configs/jmp_l.py:jmp" in command and os.path.isdir(cached):  # the demo's dataset
                jmp_data_from_default(copy, next(os.path.join(cached, d) for d in os.listdir(cached)
                                                 if not d.startswith(".")))
            line = tiny(command)
            if line not in runs:
                venv = os.path.join(copy, ".venv") if os.path.exists(os.path.join(copy, ".venv", "bin", "pip")) \
                    else None
                env = user_environment(str(root), venv)
                if "python -m pytest" in line:
                    env["PYTEST_ADDOPTS"] = suite_selection(copy)
                runs[line] = run_command(line, copy, env)
    print("\n".join(f"{seconds:7.1f} s  exit {status}  {line}" for line, (status, _, seconds) in runs.items()))
    return copy, runs, not_run


def output_of(readme_run, prefix: str) -> str:
    matches = [out for command, (_, out, _) in readme_run[1].items() if command.startswith(prefix)]
    assert matches, f"no README command starts with {prefix!r}"
    return matches[0]


def test_every_readme_command_exits_0(readme_run):
    failed = {line: out[-4000:] for line, (status, out, _) in readme_run[1].items() if status != 0}
    assert not failed, "\n\n".join(f"`{line}` failed:\n{out}" for line, out in failed.items())
    runnable = {tiny(c) for block in readme_commands() for c in block if not any(m in c for m in NOT_RUNNABLE)}
    assert set(readme_run[1]) == runnable  # every block's commands, identical ones once


def test_readme_install_and_demo_pretraining(readme_run):
    copy = readme_run[0]
    out = output_of(readme_run, "python3 -m venv .venv && . .venv/bin/activate && pip install -e . &&")
    assert "finished at step 2" in out
    demo = os.path.join(copy, "workdir", "demo")
    assert os.path.isdir(os.path.join(demo, "checkpoints", "2"))
    with open(os.path.join(demo, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows
                                                                       if "loss" in r)
    # The package imported by the commands is the copy's (an editable install), not this checkout's.
    python = os.path.join(copy, ".venv", "bin", "python")
    where = subprocess.run([python, "-c", "import jmp_jax; print(jmp_jax.__file__)"], cwd="/", text=True,
                           capture_output=True, env=user_environment(os.path.dirname(copy), None)).stdout
    assert where.strip() == os.path.join(copy, "jmp_jax", "__init__.py")


def test_readme_test_command(readme_run):
    out = output_of(readme_run, "python3 -m venv .venv && . .venv/bin/activate && pip install -e \".[test]\"")
    assert re.search(r"\b[2-9] passed\b", out) and "failed" not in out and "skipped" not in out


def test_readme_conversion_pretraining_and_data_commands(readme_run):
    copy = readme_run[0]
    assert os.path.isdir(os.path.join(copy, "ckpt", "jmp_s", "0"))
    for workdir in ("jmp_s", "jmp_l", "demo_fsdp"):
        assert os.path.isdir(os.path.join(copy, "workdir", workdir, "checkpoints", "2")), workdir
    fsdp = output_of(readme_run, 'XLA_FLAGS="$XLA_FLAGS --xla_force_host_platform_device_count=2" python -m')
    assert "finished at step 2" in fsdp
    for name in ("rmd17/rmd17_ethanol-train", "rmd17/rmd17_ethanol-test", "qm9/qm9-train", "default/molecules-val",
                 "rmd17_beam/rmd17_ethanol-train"):
        assert os.path.exists(os.path.join(copy, "data", f"{name}.metadata.json")), name
    assert set(readme_run[2].values()) == set(NOT_RUNNABLE.values())


def test_readme_two_process_launch(readme_run):
    out = output_of(readme_run, "for i in 0 1; do JAX_PLATFORMS=cpu")
    assert out.count("finished at step 8") == 2, out[-3000:]  # the `:test` config's 8 steps
    assert os.path.isdir(os.path.join(readme_run[0], "workdir", "two_processes", "checkpoints", "8"))


def test_readme_finetune_evaluate_and_embeddings(readme_run):
    copy = readme_run[0]
    with open(os.path.join(copy, "workdir", "rmd17_ethanol", "results.json")) as f:
        result = json.load(f)
    assert result["task"] == "rmd17_ethanol" and math.isfinite(result["test"]["force_mae"])
    with open(os.path.join(copy, "eval", "metrics.json")) as f:
        metrics = json.load(f)["metrics"]
    assert math.isfinite(metrics["energy"]["mae"]) and math.isfinite(metrics["forces"]["mae"])
    assert os.path.exists(os.path.join(copy, "tsne", "tsne_by_dataset.png"))
    with open(os.path.join(copy, "eval_rmd17", "metrics.json")) as f:
        finetuned = json.load(f)
    assert finetuned["kind"] == "forces" and finetuned["forces_mode"] == "gradient"
    assert finetuned["metrics"]["forces"]["mae"] == pytest.approx(result["test"]["force_mae"], rel=1e-5)


# ----------------------------------------------------------------------------------------------- notebooks
def kernel_for(python: str, root) -> str:
    """A Jupyter kernel spec (under root/jupyter, put on JUPYTER_PATH) that runs `python`; its name."""
    spec_dir = os.path.join(root, "jupyter", "kernels", "user_venv")
    os.makedirs(spec_dir)
    with open(os.path.join(spec_dir, "kernel.json"), "w") as f:
        json.dump({"argv": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "user venv", "language": "python"}, f)
    return "user_venv"


def notebook_client(copy: str, name: str, kernel: str, workdir, **settings):
    """Executes <copy>/notebooks/<name>.ipynb with TINY and `settings` injected after its `parameters` cell."""
    import nbclient
    import nbformat
    nb = nbformat.read(os.path.join(copy, "notebooks", f"{name}.ipynb"), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    lines = [f"{key} = {value!r}" for key, value in dict(TINY=True, **settings).items()]
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell("\n".join(lines)))
    os.makedirs(workdir, exist_ok=True)
    return nbclient.NotebookClient(nb, kernel_name=kernel, timeout=CELL_TIMEOUT_S,
                                   resources={"metadata": {"path": str(workdir)}})


def printed(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream")


def plots(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []) if o.output_type == "display_data")


@pytest.fixture(scope="module")
def notebook_runs(readme_run, tmp_path_factory):
    """The notebooks, run outside any checkout in a fresh venv: each clones REPO_URL (the clean copy) as its
    set-up cell says, the first pip-installs jmp_jax from its clone; QM9 pre-trains its own tiny model, the
    other two load the README's demo pre-training, side by side (each mostly compiles on one core)."""
    copy = readme_run[0]
    root = tmp_path_factory.mktemp("notebooks")
    python = seeded_venv(root / "venv")
    kernel = kernel_for(python, root)
    env = user_environment(str(root), str(root / "venv"))
    env["JUPYTER_PATH"] = str(root / "jupyter")
    url = f"file://{copy}"
    demo = os.path.join(copy, "workdir", "demo")
    with pytest.MonkeyPatch.context() as patch:
        for key in set(os.environ) - set(env):
            patch.delenv(key)
        for key, value in env.items():
            patch.setenv(key, value)
        qm9 = notebook_client(copy, "finetune_qm9", kernel, root / "qm9", REPO_URL=url)
        qm9.execute()
        clients = {"load_checkpoint": notebook_client(copy, "load_checkpoint", kernel, root / "load",
                                                      REPO_URL=url, CHECKPOINT=demo),
                   "finetune_rmd17": notebook_client(copy, "finetune_rmd17", kernel, root / "rmd17", REPO_URL=url,
                                                     RMD17_DIR=os.path.join(copy, "rmd17"), PRETRAINED=demo)}

        async def run_all():
            return await asyncio.gather(*(c.async_execute() for c in clients.values()))

        asyncio.run(run_all())
    installed = subprocess.run([python, "-c", "import jmp_jax; print(jmp_jax.__file__)"], env=env, text=True,
                               capture_output=True, cwd="/").stdout.strip()
    return root, {"finetune_qm9": qm9.nb, **{name: c.nb for name, c in clients.items()}}, installed


def finite_test_metrics(results_path) -> dict:
    with open(results_path) as f:
        result = json.load(f)
    assert result["test"] and all(math.isfinite(v) for v in result["test"].values()), result["test"]
    assert result["best_epoch"] >= 0 and os.path.isdir(result["best_checkpoint"])
    return result


def test_notebooks_install_from_repo_url(readme_run, notebook_runs):
    root, _, installed = notebook_runs
    # pip installed the clone into the notebooks' venv (not an editable checkout, not this test's jmp_jax).
    assert installed == str(root / "venv" / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
                            / "site-packages" / "jmp_jax" / "__init__.py")
    head = ["git", "rev-parse", "HEAD"]
    for name in ("qm9", "load", "rmd17"):  # each notebook's clone of REPO_URL
        clone = subprocess.run(head, cwd=root / name / "jmp_jax-repo", capture_output=True, text=True).stdout
        assert clone == subprocess.run(head, cwd=readme_run[0], capture_output=True, text=True).stdout


def test_finetune_qm9_notebook(notebook_runs):
    root, notebooks, _ = notebook_runs
    workdir = root / "qm9" / "jmp_jax-repo" / "workdir" / "notebooks" / "finetune_qm9"
    result = finite_test_metrics(workdir / "finetune" / "results.json")
    assert result["task"] == "qm9_U_0" and result["init"].startswith(str(workdir / "pretrain"))
    assert "pre-trained to step 2" in printed(notebooks["finetune_qm9"]) and plots(notebooks["finetune_qm9"]) == 1
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        with open(workdir / "data" / f"qm9-{split}.metadata.json") as f:
            assert json.load(f)["num_records"] == count


def test_finetune_rmd17_notebook(readme_run, notebook_runs):
    root, notebooks, _ = notebook_runs
    nb = notebooks["finetune_rmd17"]
    workdir = root / "rmd17" / "jmp_jax-repo" / "workdir" / "notebooks" / "finetune_rmd17"
    result = finite_test_metrics(workdir / "finetune" / "results.json")
    assert result["task"] == "rmd17_ethanol" and result["primary_metric"] == "force_mae"
    assert result["init"].startswith(os.path.join(readme_run[0], "workdir", "demo"))
    assert not (workdir / "pretrain").exists() and "rmd17_ethanol test: 2 frames" in printed(nb)
    assert "fine-tuned model: MD 2 steps" in printed(nb) and plots(nb) == 1


def test_load_checkpoint_notebook(notebook_runs):
    text = printed(notebook_runs[1]["load_checkpoint"])
    # The notebook itself asserts that the raw JMPModel.apply route reproduces predict().
    assert "matches load_pretrained().predict" in text and "MD: 2 steps" in text
    assert "using molecules" in text and "'h_block0': (9," in text
