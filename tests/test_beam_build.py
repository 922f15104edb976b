"""data_prep.build on Apache Beam (--workers N): the same files, byte for byte, as the single-process build."""
import os

import ase.io
import numpy as np
import pytest
from ase.build import fcc111, molecule
from ase.calculators.singlepoint import SinglePointCalculator

try:
    import apache_beam  # noqa: F401
except ModuleNotFoundError as err:  # fail, never skip: the beam extra is part of the test extra
    raise ImportError("tests/test_beam_build.py needs Apache Beam: pip install -e .[test] (or .[beam])") from err

from data_prep import beam_build, build  # noqa: E402  (after the import check)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(folder) -> dict[str, tuple[list[str], int]]:
    """Inputs written here in the distributed layouts: (build arguments, records per shard), several shards
    per split, so that shards are written in parallel."""
    rng = np.random.default_rng(0)
    water = molecule("H2O")
    frames = 1100  # JMP's rMD17 split takes 950 train + 50 val, the rest test
    coords = water.positions + rng.normal(scale=0.05, size=(frames, 3, 3))
    np.savez(folder / "rmd17_water.npz", nuclear_charges=water.numbers, coords=coords,
             energies=rng.normal(size=frames), forces=rng.normal(size=(frames, 3, 3)))
    slabs = []
    for i in range(3):
        slab = fcc111("Cu", (2, 2, 2), vacuum=6.0)
        slab.rattle(0.05, seed=i)
        slab.calc = SinglePointCalculator(slab, energy=-10.0 - i, forces=rng.normal(size=(len(slab), 3)))
        slabs.append(slab)
    os.makedirs(folder / "oc20")
    ase.io.write(folder / "oc20" / "0.extxyz", slabs)
    return {"rmd17": (["--source", "rmd17", "--input", str(folder / "rmd17_water.npz")], 300),
            "oc20": (["--source", "oc20", "--input", str(folder / "oc20"), "--split", "train"], 1)}


def _files(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("source", ["rmd17", "oc20"])
def test_beam_build_is_byte_identical_for_any_worker_count(source, tmp_path, monkeypatch):
    # The DirectRunner's worker processes import data_prep from the environment they inherit.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    args, per_shard = _inputs(tmp_path)[source]
    args = [*args, "--records-per-shard", str(per_shard)]
    assert build.main([*args, "--output", str(tmp_path / "single")]) == 0
    expected = _files(tmp_path / "single")
    assert sum(".tfrecord-" in name for name in expected) >= 2
    for workers in (1, 2):
        out = tmp_path / f"beam{workers}"
        assert build.main([*args, "--output", str(out), "--workers", str(workers)]) == 0
        assert _files(out) == expected, f"{source}: --workers {workers} wrote other files than the default build"


def test_beam_options_are_checked():
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        beam_build.pipeline_options(0, None, [])
    with pytest.raises(ValueError, match="FlinkRunner"):
        beam_build.pipeline_options(2, "FlinkRunner", [])
    options = beam_build.pipeline_options(None, "FlinkRunner", ["--flink_master=host:8081"]).get_all_options()
    assert (options["runner"], options["flink_master"]) == ("FlinkRunner", "host:8081")
    with pytest.raises(SystemExit):  # pipeline options without a runner are unknown flags
        build.parse_args(["--source", "rmd17", "--output", "o", "--flink_master=host:8081"])
