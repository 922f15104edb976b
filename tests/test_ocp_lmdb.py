"""OC20/OC22 input as the OCP code's LMDBs of pickled torch_geometric graphs, written here the
way OCP's S2EF preprocessing writes them (and in the older PyG 1.x pickle layout)."""
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
from ase.build import add_adsorbate, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms

from data_prep import build
from jmp_jax.data import records
from data_prep.sources import READERS, InputFormatError

lmdb = pytest.importorskip("lmdb")
torch = pytest.importorskip("torch")
pytest.importorskip("torch_geometric")
from torch_geometric.data import Data  # noqa: E402  (after the skip checks)

NUM_FRAMES = (3, 11)  # file 1 has keys "0".."10": read in numeric, not string, order


def _slab(seed: int):
    """A rattled Cu(111) 2x2x2 slab with an O adsorbate: tags 0/1/2, bottom layer fixed, EMT labels."""
    atoms = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    add_adsorbate(atoms, "O", 1.6, "fcc")
    atoms.set_tags([0] * 4 + [1] * 4 + [2])
    atoms.set_constraint(FixAtoms(indices=range(4)))
    atoms.rattle(0.05, seed=seed)
    atoms.calc = EMT()
    return atoms


def _fields(atoms, dtype) -> dict:
    """The graph fields of OCP's AtomsToGraphs (energy a Python float, fixed as floats)."""
    fixed = np.zeros(len(atoms))
    fixed[atoms.constraints[0].index] = 1
    tensor = lambda x: torch.tensor(np.asarray(x), dtype=dtype)  # noqa: E731
    return {
        "pos": tensor(atoms.get_positions()),
        "cell": tensor(atoms.cell.array).view(1, 3, 3),
        "atomic_numbers": tensor(atoms.get_atomic_numbers()),
        "natoms": len(atoms),
        "tags": torch.LongTensor(atoms.get_tags()),
        "fixed": tensor(fixed),
    }


def _pyg1_pickle(fields: dict) -> bytes:
    """A pickle as PyG 1.x made it: fields directly in the Data's __dict__ (no `_store`)."""
    old = Data.__new__(Data)
    old.__dict__.update(fields, x=None, edge_index=None, __num_nodes__=None)
    return pickle.dumps(old, protocol=-1)


def _write_lmdb(path, values: dict, length: int | None = None):
    env = lmdb.open(str(path), map_size=1 << 24, subdir=False, meminit=False, map_async=True)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(str(key).encode("ascii"), value)
        if length is not None:
            txn.put(b"length", pickle.dumps(length, protocol=-1))
    env.sync()
    env.close()


@pytest.fixture(scope="module")
def lmdb_folder(tmp_path_factory):
    """data.0000.lmdb: OCP S2EF style (PyG 2 Data, float32, y/force, sid/fid, `length` key) plus
    one NaN-energy frame; data.0001.lmdb: PyG 1.x layout, float64, energy/forces, no `length`."""
    folder = tmp_path_factory.mktemp("s2ef_lmdb")
    frames = [[_slab(100 * file + seed) for seed in range(n)] for file, n in enumerate(NUM_FRAMES)]
    values = {}
    for fid, atoms in enumerate(frames[0]):
        values[fid] = pickle.dumps(Data(
            **_fields(atoms, torch.float32), y=atoms.get_potential_energy(),
            force=torch.Tensor(atoms.get_forces(apply_constraint=False)),
            sid=torch.LongTensor([7]), fid=torch.LongTensor([fid])), protocol=-1)
    values[len(values)] = pickle.dumps(Data(**_fields(frames[0][0], torch.float32), y=float("nan")), protocol=-1)
    _write_lmdb(folder / "data.0000.lmdb", values, length=len(values))
    _write_lmdb(folder / "data.0001.lmdb", {
        key: _pyg1_pickle(dict(
            _fields(atoms, torch.float64), energy=torch.tensor(atoms.get_potential_energy(), dtype=torch.float64),
            forces=torch.tensor(atoms.get_forces(apply_constraint=False), dtype=torch.float64)))
        for key, atoms in enumerate(frames[1])
    })
    return folder, frames


def _plan_records(path):
    (plan,) = READERS["oc20"](str(path), source="oc20", split="train")
    return plan, list(plan.records())


def test_records_equal_the_source_structures(lmdb_folder):
    folder, frames = lmdb_folder
    plan, recs = _plan_records(folder)
    assert [os.path.basename(f) for f in plan.source_files] == ["data.0000.lmdb", "data.0001.lmdb"]
    assert len(recs) == sum(NUM_FRAMES) + 1
    assert [r["source_id"] for r in recs[:2]] == ["data.0000.lmdb:0,sid=7,fid=0", "data.0000.lmdb:1,sid=7,fid=1"]
    assert [r["source_id"] for r in recs[-2:]] == ["data.0001.lmdb:9", "data.0001.lmdb:10"]
    assert np.isnan(recs[NUM_FRAMES[0]]["energy"])
    pairs = [(r, a, np.float32) for r, a in zip(recs, frames[0])]
    pairs += [(r, a, np.float64) for r, a in zip(recs[NUM_FRAMES[0] + 1:], frames[1])]
    for rec, atoms, stored in pairs:
        np.testing.assert_array_equal(rec["atomic_numbers"], atoms.get_atomic_numbers())
        np.testing.assert_array_equal(rec["positions"], atoms.get_positions().astype(stored))
        np.testing.assert_array_equal(rec["cell"], atoms.cell.array.astype(stored))
        np.testing.assert_array_equal(rec["tags"], [0, 0, 0, 0, 1, 1, 1, 1, 2])
        np.testing.assert_array_equal(rec["fixed"], [1, 1, 1, 1, 0, 0, 0, 0, 0])
        assert rec["pbc"].all() and rec["positions"].dtype == np.float64
        assert rec["energy"] == atoms.get_potential_energy()  # float64, unrounded
        np.testing.assert_array_equal(rec["forces"], atoms.get_forces(apply_constraint=False).astype(stored))
    assert np.abs(recs[0]["forces"]).max() > 0.01


def test_cli_build_skips_nan_frames_and_keeps_float64_energies(lmdb_folder, tmp_path):
    folder, frames = lmdb_folder
    out = str(tmp_path / "out")
    assert build.main(["--source", "oc20", "--input", str(folder), "--output", out, "--split", "train"]) == 0
    meta = records.load_metadata(out, "oc20", "train")
    assert meta["num_records"] == sum(NUM_FRAMES) and meta["skipped"]["nan_labels"] == 1
    assert meta["has_energy"] and meta["has_forces"] and meta["units"]["energy"] == "eV"
    energies = [r["energy"] for r in records.iterate_records(out, "oc20", "train")]
    assert energies == [a.get_potential_energy() for a in frames[0] + frames[1]]


def test_energy_kind_of_lmdb_splits(lmdb_folder, tmp_path):
    """OC20 S2EF LMDBs hold referenced energies (preprocess_ef.py --ref-energy), OC22's totals, unless told."""
    folder, _ = lmdb_folder
    out = str(tmp_path / "out")
    assert build.main(["--source", "oc20", "--input", str(folder), "--output", out, "--split", "train"]) == 0
    assert records.load_metadata(out, "oc20", "train")["energy_kind"] == "referenced"
    assert build.main(["--source", "oc20", "--input", str(folder), "--output", out, "--split", "val",
                       "--energy-kind", "total"]) == 0
    assert records.load_metadata(out, "oc20", "val")["energy_kind"] == "total"
    (plan,) = READERS["oc22"](str(folder), source="oc22", split="train")
    assert plan.energy_kind == "total"


def test_single_lmdb_file_input(lmdb_folder):
    folder, frames = lmdb_folder
    _, recs = _plan_records(folder / "data.0001.lmdb")
    assert [r["source_id"] for r in recs] == [f"data.0001.lmdb:{k}" for k in range(NUM_FRAMES[1])]


def test_corrupt_value_names_file_and_key(lmdb_folder, tmp_path):
    folder, _ = lmdb_folder
    good = lmdb.open(str(folder / "data.0000.lmdb"), subdir=False, readonly=True, lock=False)
    with good.begin() as txn:
        first = txn.get(b"0")
    good.close()
    _write_lmdb(tmp_path / "broken.lmdb", {0: first, 1: b"\x00 not a pickle \xff"}, length=2)
    with pytest.raises(InputFormatError, match=r"broken\.lmdb: key '1' is not a pickled graph"):
        _plan_records(tmp_path)


@pytest.mark.parametrize("case,match", [
    ("length", r"short\.lmdb: key '2' missing"),
    ("not_lmdb", r"junk\.lmdb: cannot open as an LMDB file"),
    ("mixed", r"both OCP LMDBs and ASE-readable files"),
])
def test_malformed_inputs_name_the_file(tmp_path, case, match):
    if case == "length":  # `length` counts a frame that is not stored
        _write_lmdb(tmp_path / "short.lmdb", {k: pickle.dumps(Data(**_fields(_slab(k), torch.float32)))
                                              for k in range(2)}, length=3)
    elif case == "not_lmdb":
        (tmp_path / "junk.lmdb").write_bytes(b"\x00 this is not an lmdb \xff" * 1000)
    else:
        _write_lmdb(tmp_path / "data.0000.lmdb", {}, length=0)
        (tmp_path / "0.extxyz").write_text("1\n\nH 0 0 0\n")
    with pytest.raises(InputFormatError, match=match):
        _plan_records(tmp_path)


def test_missing_dependencies_give_the_install_command(lmdb_folder, monkeypatch):
    folder, _ = lmdb_folder
    monkeypatch.setitem(sys.modules, "torch_geometric", None)  # makes `import torch_geometric` fail
    with pytest.raises(InputFormatError, match=r"data\.0000\.lmdb: .*pip install -e \.\[ocp-lmdb\]"):
        READERS["oc20"](str(folder), source="oc20", split="train")


def test_package_import_does_not_import_torch():
    code = "import sys, data_prep.build, data_prep.sources.ocp_lmdb; assert 'torch' not in sys.modules"
    root = os.path.join(os.path.dirname(__file__), "..")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
