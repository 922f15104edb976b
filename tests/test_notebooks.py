"""Runs every notebook in notebooks/ top to bottom with its TINY settings (nbclient, python3 kernel).

The settings are injected as a cell after the `parameters`-tagged cell (as papermill does). The QM9
notebook pre-trains a tiny model; the other two reuse that checkpoint through their checkpoint variable,
so both routes (pre-train here / point to a checkpoint) run.
"""
import asyncio
import json
import math
import os
import sys

import pytest

from fixture_files import data_path

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("tblite")  # labels the embedded default dataset used for the tiny pre-training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")
TIMEOUT_S = 300  # per cell


def client_for(name: str, workdir, **settings) -> "nbclient.NotebookClient":
    """A client that executes notebooks/<name>.ipynb in `workdir` with TINY and `settings` injected."""
    nb = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{name}: expected one cell tagged 'parameters'"
    lines = [f"{key} = {value!r}" for key, value in dict(TINY=True, REPO_DIR=REPO, **settings).items()]
    # The kernel must be this interpreter's environment (where the test's packages are installed).
    lines.append(f"import sys; assert sys.prefix == {sys.prefix!r}, sys.prefix")
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell("\n".join(lines)))
    return nbclient.NotebookClient(nb, kernel_name="python3", timeout=TIMEOUT_S,
                                   resources={"metadata": {"path": str(workdir)}})


def outputs_of(nb, output_type: str) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == output_type]


def printed(nb) -> str:
    return "".join(o.get("text", "") for o in outputs_of(nb, "stream"))


def finite_test_metrics(results_path) -> dict:
    with open(results_path) as f:
        result = json.load(f)
    assert result["test"] and all(math.isfinite(v) for v in result["test"].values()), result["test"]
    assert result["best_epoch"] >= 0 and os.path.isdir(result["best_checkpoint"])
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A clean working directory; kernels (which inherit this environment) run JAX on CPU and share the
    suite's persistent XLA cache (conftest). The tiny runs execute each program a few times only, so
    cheaper XLA optimisation saves more compile time than it costs.
    """
    root = tmp_path_factory.mktemp("notebooks")
    kernel_env = {"JAX_PLATFORMS": "cpu",
                  "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in kernel_env.items():
            patch.setenv(key, value)
        yield root


@pytest.fixture(scope="module")
def qm9_run(env):
    """The QM9 notebook, which also pre-trains the checkpoint the other notebooks load."""
    client = client_for("finetune_qm9", env, WORKDIR="runs/qm9")
    client.execute()
    return client.nb, env / "runs" / "qm9"


@pytest.fixture(scope="module")
def downstream_runs(env, qm9_run):
    """The rMD17 and checkpoint notebooks on the QM9 notebook's pre-trained weights, side by side
    (each kernel mostly compiles on one core)."""
    pretrained = str(qm9_run[1] / "pretrain")
    clients = {"load_checkpoint": client_for("load_checkpoint", env, WORKDIR="runs/load", CHECKPOINT=pretrained)}
    clients["finetune_rmd17"] = client_for("finetune_rmd17", env, WORKDIR="runs/rmd17", RMD17_DIR=data_path("rmd17"),
                                           PRETRAINED=pretrained)

    async def run_all():
        return await asyncio.gather(*(c.async_execute() for c in clients.values()))

    asyncio.run(run_all())
    return {name: c.nb for name, c in clients.items()}, pretrained


def test_finetune_qm9_notebook(qm9_run):
    nb, workdir = qm9_run
    result = finite_test_metrics(workdir / "finetune" / "results.json")
    assert result["task"] == "qm9_U_0" and result["init"].startswith(str(workdir / "pretrain"))
    assert "pre-trained to step 2" in printed(nb)
    assert any("image/png" in o.data for o in outputs_of(nb, "display_data")), "no learning-curve plot"
    for split, count in (("train", 8), ("val", 4), ("test", 4)):
        with open(workdir / "data" / f"qm9-{split}.metadata.json") as f:
            assert json.load(f)["num_records"] == count


def test_finetune_rmd17_notebook(env, downstream_runs):
    notebooks, pretrained = downstream_runs
    nb = notebooks["finetune_rmd17"]
    result = finite_test_metrics(env / "runs" / "rmd17" / "finetune" / "results.json")
    assert result["task"] == "rmd17_ethanol" and result["primary_metric"] == "force_mae"
    assert result["init"].startswith(pretrained) and not (env / "runs" / "rmd17" / "pretrain").exists()
    assert "rmd17_ethanol test: 2 frames" in printed(nb)


def test_load_checkpoint_notebook(downstream_runs):
    text = printed(downstream_runs[0]["load_checkpoint"])
    # The notebook itself asserts that the raw JMPModel.apply route reproduces predict().
    assert "matches load_pretrained().predict" in text and "MD: 2 steps" in text
    assert "using molecules" in text and "'h_block0': (9," in text
