"""Fault injection into structures: inputs that would kill the process inside the native neighbour search
(vesin dies with SIGFPE on a coordinate of 1e6 Å) are refused with an error naming the structure and atom,
on every path that builds graphs. The paths run in a subprocess, where a crash cannot take pytest down."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_prep import shard_writer
from jmp_jax.data import records
from jmp_jax.graph import validate
from jmp_jax.pretrained import PretrainedInputError
from test_pretrained import ethanol, write_random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _last_error_line(code: str) -> str:
    """Runs `code` in a fresh interpreter; it must end in a Python exception (exit 1), not a signal."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests")]))
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=REPO)
    assert done.returncode == 1, f"exit {done.returncode}: {done.stderr[-2000:]}"
    return done.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("jmp_random_guards") / "ckpt")


def test_huge_coordinate_in_predict_is_a_clear_error(checkpoint):
    line = _last_error_line(f"""
        import jmp_jax
        from test_pretrained import ethanol
        atoms = ethanol()
        atoms.positions[4, 0] = 1e6
        jmp_jax.load_pretrained({checkpoint!r}).predict([ethanol(), atoms])
    """)
    assert "GraphInputError: structure 'atoms_list[1] (C2H6O)': atom 4 has a coordinate of 1e+06 Å" in line


def test_huge_coordinate_in_the_ase_calculator_is_a_clear_error(checkpoint):
    line = _last_error_line(f"""
        from jmp_jax.ase_calculator import JMPCalculator
        from test_pretrained import ethanol
        atoms = ethanol()
        atoms.positions[2, 1] = -3e6
        atoms.calc = JMPCalculator({checkpoint!r})
        atoms.get_potential_energy()
    """)
    assert "atom 2 has a coordinate of 3e+06 Å" in line


def test_huge_coordinate_in_a_pipeline_record_is_a_clear_error():
    line = _last_error_line("""
        import numpy as np
        from ase.build import molecule
        from jmp_jax.data.pipeline import Pipeline, TaskSpec
        from jmp_jax.graph import batching
        from jmp_jax.graph.build import GraphSettings
        atoms = molecule("H2O")
        positions = atoms.positions.copy()
        positions[0, 2] = 1e6
        record = dict(atomic_numbers=atoms.numbers, positions=positions, cell=np.zeros((3, 3)), tags=np.full(3, 2),
                      fixed=np.zeros(3, bool), energy=0.0, forces=np.zeros((3, 3)), source_id="far-water")
        budgets = batching.Budgets.from_array(np.full(len(batching.Budgets.zeros().as_array()), 64))
        spec = TaskSpec("water", GraphSettings(cutoff=6.0, max_neighbors=8, pbc=(False,) * 3), budgets)
        next(Pipeline([spec], [[record]], seed=0, temperature=1.0, num_batch_shards=1))
    """)
    assert "structure 'water record 0 (far-water)': atom 0 has a coordinate of 1e+06 Å" in line


def test_huge_coordinate_in_a_fine_tuning_record_is_a_clear_error():
    line = _last_error_line("""
        import numpy as np
        from jmp_jax.finetune.data import DataSpec, build_graphs
        record = dict(atomic_numbers=np.array([6, 8]), positions=np.array([[0.0, 0.0, 0.0], [1.1, 2e6, 0.0]]),
                      cell=np.zeros((3, 3)), tags=np.full(2, 2), fixed=np.zeros(2, bool), source_id="far-co")
        build_graphs(record, DataSpec("qm9", cutoff=8.0, max_neighbors=30, pbc=False, batch_size=4), 5)
    """)
    assert "structure 'qm9 record 5 (far-co)': atom 1 has a coordinate of 2e+06 Å" in line


def test_spread_beyond_the_search_limit_at_a_small_cutoff_is_a_clear_error():
    line = _last_error_line("""
        import numpy as np
        from jmp_jax.graph.build import GraphSettings, build_structure_graphs
        positions = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 9e3]])
        settings = GraphSettings(cutoff=0.6, max_neighbors=4, pbc=(False,) * 3)
        build_structure_graphs([1, 1, 1], positions, None, None, None, settings, name="needle")
    """)
    assert "structure 'needle': atom 2 lies 9e+03 Å from the others along an axis" in line


def test_cell_too_small_for_the_cutoff_is_refused_before_the_search():
    line = _last_error_line("""
        import numpy as np
        from jmp_jax.graph.build import GraphSettings, build_structure_graphs
        build_structure_graphs([29], np.zeros((1, 3)), np.diag([10.0, 10.0, 1e-5]), None, None,
                               GraphSettings(cutoff=12.0, max_neighbors=30, pbc=(True,) * 3), name="foil")
    """)
    assert "structure 'foil': cell too small for the 12.0 Å cutoff" in line


def test_infinite_cutoff_is_refused():
    with pytest.raises(validate.GraphInputError, match="cutoff must be a positive finite distance, got inf"):
        validate.check_structure("w", [8], np.zeros((1, 3)), None, False, None, None, cutoff=float("inf"))


@pytest.mark.parametrize("z", [119, 120, 121])
def test_unknown_element_in_predict_is_a_clear_error(z):
    from jmp_jax.pretrained import build_graphs  # what `predict` builds its graphs with, before any model call
    atoms = ethanol()
    atoms.numbers[3] = z
    with pytest.raises(PretrainedInputError, match=rf"atoms_list\[0\]: unknown element Z={z} at atom 3 "
                                                   r"\(valid: 1..118\)"):
        build_graphs([atoms])


@pytest.mark.parametrize("tasks", [{"name": "a", "energy_std": 1.0, "force_std": 1.0}, "oc20", [("name", "a")], 3])
def test_load_pretrained_tasks_of_the_wrong_type(checkpoint, tasks):
    import jmp_jax
    with pytest.raises(PretrainedInputError, match="tasks must be a list of dicts, one per head"):
        jmp_jax.load_pretrained(checkpoint, tasks=tasks)


def test_build_skips_and_counts_far_coordinates(tmp_path):
    assert records.MAX_ABS_COORDINATE == validate.MAX_ABS_COORDINATE
    good = records.make_record([8, 1], [[0.0, 0.0, 0.0], [0.97, 0.0, 0.0]], source_id="near", energy=-1.0)
    far = records.make_record([8, 1], [[0.0, 0.0, 0.0], [1e6, 0.0, 0.0]], source_id="far", energy=-1.0)
    meta = shard_writer.write_split([good, far], str(tmp_path), "toy", "train", units={}, source_files=[])
    assert meta["num_records"] == 1 and meta["skipped"]["far_positions"] == 1
    assert [r["source_id"] for r in records.iterate_records(str(tmp_path), "toy", "train")] == ["near"]
