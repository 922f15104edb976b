"""Dataset readers on tiny files written here in the distributed layouts, and on the real
public samples in ../shared/data (fixture_files.data_path)."""
import csv
import gzip
import json
import os

import ase.io
import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.constraints import FixAtoms

from data_prep import build
from jmp_jax.data import records
from fixture_files import data_path
from jmp_jax.data.metadata import sha256_file
from data_prep.sources import READERS, InputFormatError, common, qm9

KCAL = common.KCAL_MOL_EV
HARTREE = common.HARTREE_EV
BOHR = common.BOHR_ANGSTROM


def _plans(source, path, **kw):
    return {(p.name, p.split): p for p in READERS[source](path, source=source, **kw)}


def _records(plan):
    return list(plan.records())


def test_kcal_per_mol_factor():
    assert KCAL == pytest.approx(0.04336410424, rel=1e-10)
    assert HARTREE == pytest.approx(27.211386246, rel=1e-10)


def test_ani1x_hdf5(tmp_path):
    path = str(tmp_path / "ani1x-release.h5")
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for i in range(10):
            n, c = 4 + i % 3, 3 + i
            g = f.create_group(f"C{i}H{n}")
            g["atomic_numbers"] = np.array([6] + [1] * (n - 1))
            g["coordinates"] = rng.normal(size=(c, n, 3))
            energy = rng.normal(size=c) - 40
            energy[0] = np.nan if i == 2 else energy[0]
            g["wb97x_dz.energy"] = energy
            g["wb97x_dz.forces"] = rng.normal(size=(c, n, 3))
            g["ccsd(t)_cbs.energy"] = np.full(c, np.nan)
        small = f.create_group("H2O")
        small["atomic_numbers"] = np.array([8, 1, 1])
        small["coordinates"] = np.zeros((5, 3, 3))
        small["wb97x_dz.energy"] = np.zeros(5)
        small["wb97x_dz.forces"] = np.zeros((5, 3, 3))
    plans = _plans("ani1x", path)
    frames = {s: _records(plans[("ani1x", s)]) for s in ("train", "val", "test")}
    molecules = {s: {r["source_id"].split(":")[0] for r in frames[s]} for s in frames}
    assert set.union(*molecules.values()) == {f"C{i}H{4 + i % 3}" for i in range(10)}
    assert not molecules["train"] & molecules["val"] and not molecules["val"] & molecules["test"]
    total = sum(3 + i for i in range(10))
    assert sum(len(v) for v in frames.values()) == total
    assert plans[("ani1x", "train")].extra_metadata["dropped_small_molecules"] == {"molecules": 1, "frames": 5}
    with h5py.File(path) as f:
        rec = next(r for r in frames["train"] if r["source_id"].endswith(":1"))
        key = rec["source_id"].split(":")[0]
        assert rec["energy"] == f[key]["wb97x_dz.energy"][1] * HARTREE
        np.testing.assert_allclose(rec["forces"], f[key]["wb97x_dz.forces"][1] * HARTREE)
    assert (rec["tags"] == 2).all() and not rec["fixed"].any() and not rec["pbc"].any()
    assert not rec["cell"].any()


def test_transition1x_hdf5_uses_its_split_groups(tmp_path):
    path = str(tmp_path / "transition1x.h5")
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        for split, count in (("train", 3), ("val", 1), ("test", 2)):
            for r in range(count):
                g = f.create_group(f"{split}/C2H2O/rxn{r:04d}")
                g["atomic_numbers"] = np.array([6, 6, 1, 1, 8])
                g["positions"] = rng.normal(size=(4, 5, 3))
                g["wB97x_6-31G(d).energy"] = rng.normal(size=4) - 5000
                g["wB97x_6-31G(d).forces"] = rng.normal(size=(4, 5, 3))
                ts = g.create_group("transition_state")
                ts["positions"] = rng.normal(size=(1, 5, 3))
    plans = _plans("transition1x", path)
    assert [len(_records(plans[("transition1x", s)])) for s in ("train", "val", "test")] == [12, 4, 8]
    rec = _records(plans[("transition1x", "test")])[5]
    assert rec["source_id"] == "C2H2O/rxn0001:1"
    with h5py.File(path) as f:
        assert rec["energy"] == f["test/C2H2O/rxn0001/wB97x_6-31G(d).energy"][1]


def test_spice_hdf5_units_and_force_sign(tmp_path):
    path = str(tmp_path / "dipeptides.h5")
    rng = np.random.default_rng(2)
    with h5py.File(path, "w") as f:
        for m in range(4):
            g = f.create_group(f"mol{m}")
            g["atomic_numbers"] = np.array([6, 1, 1, 8])
            g["conformations"] = rng.normal(size=(5, 4, 3))
            g["dft_total_energy"] = rng.normal(size=5) - 200
            g["dft_total_gradient"] = rng.normal(size=(5, 4, 3))
            g["formation_energy"] = rng.normal(size=5)
            g["smiles"] = np.array([b"CO"])
    plans = _plans("spice", path)
    parts = {s: _records(plans[("spice_dipeptides", s)]) for s in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [16, 2, 2]
    rec = parts["val"][0]
    name, conf = rec["source_id"].split(":")
    with h5py.File(path) as f:
        g = f[name]
        np.testing.assert_allclose(rec["positions"], g["conformations"][int(conf)] * BOHR)
        np.testing.assert_allclose(rec["forces"], -g["dft_total_gradient"][int(conf)] * HARTREE / BOHR)
        assert rec["energy"] == pytest.approx(g["dft_total_energy"][int(conf)] * HARTREE, rel=1e-15)
        assert rec["targets"]["formation_energy"] == pytest.approx(g["formation_energy"][int(conf)] * HARTREE)


def test_rmd17_full_file_split(tmp_path):
    path = str(tmp_path / "rmd17_uracil.npz")
    rng = np.random.default_rng(3)
    np.savez(path, nuclear_charges=np.array([6, 7, 8]), coords=rng.normal(size=(1010, 3, 3)),
             energies=rng.normal(size=1010) - 1000, forces=rng.normal(size=(1010, 3, 3)))
    plans = _plans("rmd17", path)
    parts = {s: _records(plans[("rmd17_uracil", s)]) for s in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [950, 50, 10]
    ids = sorted(int(r["source_id"].split(":")[1]) for v in parts.values() for r in v)
    assert ids == list(range(1010))


def test_rmd17_real_official_split_files():
    train_path = data_path("rmd17", "rmd17_ethanol_train_01.npz")
    data = np.load(train_path)
    plans = _plans("rmd17", train_path)
    assert set(plans) == {("rmd17_ethanol", "train"), ("rmd17_ethanol", "val")}
    train, val = _records(plans[("rmd17_ethanol", "train")]), _records(plans[("rmd17_ethanol", "val")])
    assert (len(train), len(val)) == (950, 50)
    frames = sorted(int(r["source_id"].split(":")[1]) for r in train + val)
    assert frames == list(range(1000))
    for rec in train[:5] + val[:5]:
        i = int(rec["source_id"].split(":")[1])
        assert rec["energy"] == data["energies"][i] * 0.043364104241800934
        np.testing.assert_allclose(rec["forces"], data["forces"][i] * KCAL, rtol=1e-12)
        np.testing.assert_array_equal(rec["positions"], data["coords"][i])
        np.testing.assert_array_equal(rec["atomic_numbers"], [6, 6, 8, 1, 1, 1, 1, 1, 1])
    test = _records(_plans("rmd17", data_path("rmd17", "rmd17_ethanol_test_01.npz"))[("rmd17_ethanol", "test")])
    assert len(test) == 1000
    assert -4300 < test[0]["energy"] < -4100  # ethanol ≈ -97,080 kcal/mol ≈ -4,210 eV


def test_md22_npz(tmp_path):
    path = str(tmp_path / "md22_buckyball-catcher.npz")
    rng = np.random.default_rng(4)
    np.savez(path, z=np.array([6, 6, 1]), R=rng.normal(size=(700, 3, 3)),
             E=rng.normal(size=(700, 1)) - 5e5, F=rng.normal(size=(700, 3, 3)))
    plans = _plans("md22", path)
    parts = {s: _records(plans[("md22_buckyball-catcher", s)]) for s in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [570, 30, 100]
    data = np.load(path)
    rec = parts["test"][0]
    assert rec["energy"] == data["E"][int(rec["source_id"].split(":")[1]), 0] * KCAL
    with pytest.raises(InputFormatError, match="md22_unknown.npz"):
        _plans("md22", str(tmp_path / "md22_unknown.npz"))


QM9_HEADER = ("XYZ_file,Index,SMILES,InChi,N_atoms,Stoichiometry,Elements,XYZ_Ang,Mulliken_pop,Harmonic_Freq_cmi,"
              "RotA_GHz,RotB_GHz,RotC_GHz,Dipole_debye,Polarizability_bohr3,HOMO_au,LUMO_au,HOMO_LUMO_gap_au,"
              "R2_bohr2,ZPVE_au,InternalEnergy_0K_au,InternalEnergy_298K_au,Enthalphy_298K_au,"
              "GibbsFreeEnergy_298K_au,Heatcapacity_Cv_cal_mol_K")


def _write_qm9_csvs(folder, num):
    """`num` methane-like rows spread over the three part files, in reverse index order."""
    os.makedirs(folder, exist_ok=True)
    fields = QM9_HEADER.split(",")
    writers = []
    for name in qm9.CSV_NAMES:
        f = open(os.path.join(folder, name), "w", newline="")
        writer = csv.writer(f)
        writer.writerow(fields)
        writers.append((f, writer))
    for index in range(num, 0, -1):
        xyz = [[0.0, 0.0, 0.01 * index], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63],
               [0.63, -0.63, -0.63]]
        row = [f"dsgdb9nsd_{index:06d}.xyz", index, "C", "InChI", 5, "[4,1,0,0,0]", "['C','H','H','H','H']",
               json.dumps(xyz), "[]", "[]", 157.7, 157.7, 157.7, 0.1 * index, 13.21, -0.3877, 0.1171, 0.5048,
               35.3641, 0.044749, -40.47893, -40.476062, -40.475117, -40.498597, 6.469]
        writers[index % 3][1].writerow(row)
    for f, _ in writers:
        f.close()


def test_qm9_csv_units_references_and_split(tmp_path):
    folder = str(tmp_path / "qm9data")
    _write_qm9_csvs(folder, 25)
    plans = _plans("qm9", folder, qm9_holdout=5)
    parts = {s: _records(plans[("qm9", s)]) for s in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [15, 5, 5]
    # split indices refer to molecules sorted by GDB index
    expected = np.random.RandomState(42).permutation(25)[15:20] + 1
    assert [r["source_id"] for r in parts["val"]] == [f"gdb_{i}" for i in expected]
    rec = parts["val"][0]
    t = rec["targets"]
    assert t["mu"] == pytest.approx(0.1 * int(rec["source_id"][4:]))
    assert t["delta_eps"] == pytest.approx(0.5048 * HARTREE)
    assert t["U_0"] == pytest.approx(-40.47893 * HARTREE - (-1036.0 + 4 * -16.430))
    assert t["c_v"] == pytest.approx(6.469 - (2.0350 + 4 * 1.2409))
    assert t["alpha"] == 13.21 and t["R_2_Abs"] == 35.3641
    assert "energy" not in rec and not rec["pbc"].any()


def test_qm9_real_package_rows(tmp_path):
    try:
        package_csvs = qm9.csv_paths(None)
    except InputFormatError:
        pytest.skip("qm9pack not installed")
    folder = tmp_path / "head"
    folder.mkdir()
    for path in package_csvs:  # the first rows of each real file keep the test fast
        with open(path) as src, open(folder / os.path.basename(path), "w") as dst:
            dst.writelines(line for _, line in zip(range(41), src))
    molecules = qm9.load_molecules(qm9.csv_paths(str(folder)))
    assert len(molecules) == 120
    methane = molecules[0]
    assert methane["source_id"] == "gdb_1"
    np.testing.assert_array_equal(methane["atomic_numbers"], [6, 1, 1, 1, 1])
    # CH4 U_0 = -40.47893 Ha; minus JMP's C and H references: ≈ -0.76 eV
    assert methane["targets"]["U_0"] == pytest.approx(-40.47893 * HARTREE + 1036.0 + 4 * 16.430)
    bond = np.linalg.norm(methane["positions"][0] - methane["positions"][1])
    assert bond == pytest.approx(1.09, abs=0.01)


def _structure_dict(i, use_abc=False):
    matrix = [[3.0 + 0.1 * i, 0, 0], [0, 3.0, 0], [0.5, 0, 4.0]]
    frac = [[0, 0, 0], [0.5, 0.5, 0.5]]
    sites = []
    for symbol, abc in zip(["Na", "Cl"], frac):
        site = {"species": [{"element": symbol, "occu": 1}], "abc": abc, "label": symbol, "properties": {}}
        if not use_abc:
            site["xyz"] = (np.array(abc) @ np.array(matrix)).tolist()
        sites.append(site)
    return {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0,
            "lattice": {"matrix": matrix, "pbc": [True, True, True]}, "sites": sites}


def test_matbench_json_gz_folds(tmp_path):
    path = str(tmp_path / "matbench_log_gvrh.json.gz")
    table = {"index": [f"mb-log-gvrh-{i:05d}" for i in range(1, 13)], "columns": ["structure", "log10(G_VRH)"],
             "data": [[_structure_dict(i, use_abc=i % 2 == 0), 0.1 * i] for i in range(12)]}
    with gzip.open(path, "wt") as f:
        json.dump(table, f)
    plans = _plans("matbench", path)
    assert len(plans) == 15
    test0 = _records(plans[("matbench_log_gvrh_fold0", "test")])
    # scikit-learn KFold(5, shuffle=True, random_state=18012019) on 12 items: fold 0 tests 1, 7, 8
    assert [r["source_id"] for r in test0] == ["mb-log-gvrh-00002", "mb-log-gvrh-00008", "mb-log-gvrh-00009"]
    train = _records(plans[("matbench_log_gvrh_fold0", "train")])
    val = _records(plans[("matbench_log_gvrh_fold0", "val")])
    assert (len(train), len(val)) == (8, 1)
    rec = test0[0]
    assert rec["targets"] == {"log10_g_vrh": pytest.approx(0.1)}
    np.testing.assert_allclose(rec["positions"][1], np.array([0.5, 0.5, 0.5]) @ rec["cell"])
    np.testing.assert_array_equal(rec["atomic_numbers"], [11, 17])
    assert rec["pbc"].all() and (rec["tags"] == 2).all()
    even = next(r for r in train if r["source_id"] == "mb-log-gvrh-00001")  # written with abc only
    np.testing.assert_allclose(even["positions"][1], np.array([0.5, 0.5, 0.5]) @ even["cell"])
    only = _plans("matbench", path, folds=[3])
    assert {name for name, _ in only} == {"matbench_log_gvrh_fold3"}


def test_matbench_classification_is_stratified(tmp_path):
    path = str(tmp_path / "matbench_mp_is_metal.json.gz")
    labels = [True, False, True, True, False, False, True, False, True, True, False, True]
    table = {"index": [f"mb-{i}" for i in range(12)], "columns": ["structure", "is_metal"],
             "data": [[_structure_dict(i), y] for i, y in enumerate(labels)]}
    with gzip.open(path, "wt") as f:
        json.dump(table, f)
    plans = _plans("matbench", path)
    test0 = _records(plans[("matbench_mp_is_metal_fold0", "test")])
    # scikit-learn StratifiedKFold(5, shuffle=True, random_state=18012019): fold 0 tests 8, 9, 10
    assert [r["source_id"] for r in test0] == ["mb-8", "mb-9", "mb-10"]
    assert [r["targets"]["is_metal"] for r in test0] == [1.0, 1.0, 0.0]


def test_qmof_json(tmp_path):
    systems, structures = [], []
    for i in range(20):
        gap = None if i == 3 else 1.0 + i
        systems.append({"qmof_id": f"qmof-{i}", "outputs": {"pbe": {"bandgap": gap, "energy_total": -5.0}}})
        structures.append({"qmof_id": f"qmof-{i}", "name": f"m{i}", "structure": _structure_dict(i)})
    json.dump(systems, open(tmp_path / "qmof.json", "w"))
    json.dump(structures[::-1], open(tmp_path / "qmof_structure_data.json", "w"))
    plans = _plans("qmof", str(tmp_path))
    parts = {s: _records(plans[("qmof", s)]) for s in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [16, 2, 2]
    rec = next(r for v in parts.values() for r in v if r["source_id"] == "qmof-5")
    assert rec["targets"]["bandgap"] == 6.0 and rec["cell"][0, 0] == pytest.approx(3.5)
    missing = next(r for v in parts.values() for r in v if r["source_id"] == "qmof-3")
    assert np.isnan(missing["targets"]["bandgap"])  # write_split counts it as a NaN label


def _oc20_frames(seed: int = 5) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for k in range(3):
        atoms = Atoms("Cu4CO", positions=rng.normal(size=(6, 3)) + 5, cell=np.eye(3) * 10, pbc=True)
        atoms.set_tags([0, 0, 1, 1, 2, 2])
        atoms.set_constraint(FixAtoms(indices=[0, 1]))
        atoms.calc = SinglePointCalculator(atoms, energy=-50.0 - k, forces=rng.normal(size=(6, 3)))
        frames.append(atoms)
    return frames


def test_oc20_extxyz_with_frame_metadata(tmp_path):
    """OC20's S2EF release: `<n>.txt` beside `<n>.extxyz` holds system_id,frame_number,reference_energy per
    frame; the energy becomes E - reference, as the LMDBs of preprocess_ef.py --ref-energy hold it."""
    frames = _oc20_frames()
    ase.io.write(tmp_path / "0.extxyz", frames, format="extxyz")
    (tmp_path / "0.txt").write_text("".join(f"random123,frame{k},{-10.0 - k}\n" for k in range(3)))
    ase.io.write(tmp_path / "1.extxyz", frames[:1], format="extxyz")
    (tmp_path / "1.txt").write_text("random9,frame0,-3.5\n")
    (plan,) = READERS["oc20"](str(tmp_path), source="oc20", split="train")
    assert plan.energy_kind == "referenced" and plan.units["reference_energy"] == "eV"
    recs = _records(plan)
    assert [r["source_id"] for r in recs] == [
        "random123,frame0", "random123,frame1", "random123,frame2", "random9,frame0"]
    assert [r["energy"] for r in recs] == [-40.0, -40.0, -40.0, -46.5]  # total - reference
    rec = recs[1]
    assert rec["energy"] + rec["targets"]["reference_energy"] == -51.0  # the total stays recoverable
    assert rec["targets"] == {"reference_energy": -11.0}
    np.testing.assert_array_equal(rec["tags"], [0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(rec["fixed"], [1, 1, 0, 0, 0, 0])
    np.testing.assert_allclose(rec["forces"], frames[1].calc.results["forces"])  # constraints not applied
    assert rec["pbc"].all() and rec["cell"][2, 2] == 10


def test_oc20_energy_kind_of_a_split(tmp_path):
    """Without reference energies the split holds totals; a split mixing both kinds is refused."""
    frames = _oc20_frames()
    ase.io.write(tmp_path / "0.extxyz", frames, format="extxyz")
    (plan,) = READERS["oc20"](str(tmp_path), source="oc20", split="train")
    assert plan.energy_kind == "total" and "reference_energy" not in plan.units
    assert [r["energy"] for r in _records(plan)] == [-50.0, -51.0, -52.0]
    assert all("targets" not in r or not r["targets"] for r in _records(plan))
    with pytest.raises(InputFormatError, match="--energy-kind applies to OCP LMDB input only"):
        READERS["oc20"](str(tmp_path), source="oc20", split="train", energy_kind="referenced")
    ase.io.write(tmp_path / "1.extxyz", frames[:1], format="extxyz")
    (tmp_path / "1.txt").write_text("random9,frame0,-3.5\n")
    with pytest.raises(InputFormatError, match=r"0\.extxyz: has no OC20 reference energies .* but .*1\.extxyz has"):
        READERS["oc20"](str(tmp_path), source="oc20", split="train")


def test_oc20_build_records_the_energy_kind(tmp_path):
    data = tmp_path / "in"
    data.mkdir()
    ase.io.write(data / "0.extxyz", _oc20_frames(), format="extxyz")
    (data / "0.txt").write_text("".join(f"random1,frame{k},-10.0\n" for k in range(3)))
    (meta,) = build.build("oc20", str(data), str(tmp_path / "out"), splits=["train"])
    assert meta["energy_kind"] == "referenced"
    assert records.load_metadata(str(tmp_path / "out"), "oc20", "train")["energy_kind"] == "referenced"
    assert meta["raw"]["energy_mean"] == pytest.approx(-41.0)
    assert build.main(["--source", "qm9", "--output", str(tmp_path), "--energy-kind", "total"]) == 2


def test_oc20_real_samples():
    (plan,) = READERS["oc20"](data_path("oc20", "fairchem_tests_core_models_atoms.json"), source="oc20", split="s")
    (rec,) = _records(plan)
    assert plan.energy_kind == "total"  # an ASE database of DFT total energies
    assert rec["energy"] == -135.66393572 and rec["atomic_numbers"].shape == (34,)
    assert rec["fixed"].sum() == 24 and set(rec["tags"]) <= {0, 1, 2} and rec["pbc"].all()
    assert np.abs(rec["forces"][~rec["fixed"]]).max() > 0.01
    (plan,) = READERS["oc20"](data_path("oc20", "oc_27998_vasprun.xml"), source="oc20", split="s")
    (rec,) = _records(plan)
    assert rec["energy"] == pytest.approx(-140.07469344) and rec["atomic_numbers"].shape == (16,)
    assert rec["fixed"].sum() == 8


def test_oxides_db_as_oc22_stand_in():
    (plan,) = READERS["oc22"](data_path("oxides"), source="oc22", split="train")
    recs = _records(plan)
    assert len(recs) == 295
    assert recs[0]["energy"] == pytest.approx(-41.358821) and recs[0]["pbc"].all()
    assert all(r["forces"].shape == r["positions"].shape for r in recs)


@pytest.mark.parametrize("source,name", [
    ("ani1x", "ani1x.h5"), ("spice", "spice.h5"), ("transition1x", "t1x.h5"),
    ("rmd17", "rmd17_aspirin.npz"), ("md22", "md22_DHA.npz"), ("matbench", "matbench_jdft2d.json.gz"),
    ("oc20", "0.extxyz"),
])
def test_unreadable_input_names_the_file(tmp_path, source, name):
    path = tmp_path / name
    path.write_bytes(b"\x00 this is not a dataset \xff" * 10)
    with pytest.raises(InputFormatError, match=name.replace(".", r"\.")):
        for plan in READERS[source](str(path), source=source, split="train"):
            list(plan.records())  # OC20/OC22 files are read lazily


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(InputFormatError, match="nothere"):
        READERS["oc22"](str(tmp_path / "nothere"), source="oc22", split="train")
    with pytest.raises(InputFormatError, match="qmof.json"):
        READERS["qmof"](str(tmp_path), source="qmof")


RMD17_VAL = 50


def _write_rmd17_release(root, num_frames=90, train=None, test=None, fold=1):
    """A tiny rmd17.tar.bz2 layout: rmd17/npz_data/rmd17_uracil.npz and rmd17/splits/index_*_0K.csv.
    Returns (npz path, splits folder, train indices, test indices)."""
    rng = np.random.default_rng(6)
    order = rng.permutation(num_frames)
    train = order[:RMD17_VAL + 10] if train is None else np.asarray(train)
    test = order[RMD17_VAL + 10:RMD17_VAL + 22] if test is None else np.asarray(test)
    npz_dir, splits_dir = root / "rmd17" / "npz_data", root / "rmd17" / "splits"
    npz_dir.mkdir(parents=True)
    splits_dir.mkdir()
    path = str(npz_dir / "rmd17_uracil.npz")
    np.savez(path, nuclear_charges=np.array([6, 7, 8]), coords=rng.normal(size=(num_frames, 3, 3)),
             energies=rng.normal(size=num_frames) - 1000, forces=rng.normal(size=(num_frames, 3, 3)))
    for role, idx in (("train", train), ("test", test)):
        (splits_dir / f"index_{role}_{fold:02d}.csv").write_text("".join(f"{i}\n" for i in idx))
    return path, splits_dir, train, test


def _frame_ids(recs):
    return np.array([int(r["source_id"].split(":")[1]) for r in recs])


def test_rmd17_official_fold_from_index_files(tmp_path):
    path, splits_dir, train_idx, test_idx = _write_rmd17_release(tmp_path)
    plans = _plans("rmd17", path, fold=1)
    parts = {s: _records(plans[("rmd17_uracil", s)]) for s in ("train", "val", "test")}
    ids = {s: _frame_ids(v) for s, v in parts.items()}
    np.testing.assert_array_equal(ids["test"], test_idx)  # test: the CSV's frames in file order
    # train/val: positions of one RandomState(42) shuffle of the train CSV's positions
    order = np.random.RandomState(42).permutation(len(train_idx))
    np.testing.assert_array_equal(ids["train"], train_idx[order[:10]])
    np.testing.assert_array_equal(ids["val"], train_idx[order[10:]])
    data = np.load(path)
    for rec in parts["train"][:3] + parts["val"][:3] + parts["test"][:3]:
        i = int(rec["source_id"].split(":")[1])
        assert rec["energy"] == data["energies"][i] * KCAL
        np.testing.assert_allclose(rec["forces"], data["forces"][i] * KCAL, rtol=1e-12)
        np.testing.assert_array_equal(rec["positions"], data["coords"][i])
    # the per-split npz of the same train file gives the same val frames
    split_file = tmp_path / "rmd17_uracil_train_01.npz"
    np.savez(split_file, nuclear_charges=data["nuclear_charges"], coords=data["coords"][train_idx],
             energies=data["energies"][train_idx], forces=data["forces"][train_idx])
    val_positions = _frame_ids(_records(_plans("rmd17", str(split_file))[("rmd17_uracil", "val")]))
    np.testing.assert_array_equal(train_idx[val_positions], ids["val"])
    meta = plans[("rmd17_uracil", "test")].extra_metadata
    assert meta["fold"] == "01" and meta["split_rule"] == "official_index_files"
    assert os.path.basename(meta["index_files"]["train"]) == "index_train_01.csv"
    explicit = _plans("rmd17", path, fold=1, splits_dir=str(splits_dir))
    np.testing.assert_array_equal(_frame_ids(_records(explicit[("rmd17_uracil", "val")])), ids["val"])


def test_rmd17_fold_cli_records_index_files_with_checksums(tmp_path, capsys):
    path, splits_dir, _, test_idx = _write_rmd17_release(tmp_path / "release", fold=3)
    moved = tmp_path / "elsewhere"
    os.rename(splits_dir, moved)
    out = str(tmp_path / "out")
    assert build.main(["--source", "rmd17", "--input", path, "--output", out, "--fold", "3"]) == 2
    assert "index_train_03.csv" in capsys.readouterr().err  # ../splits is gone
    argv = ["--source", "rmd17", "--input", path, "--output", out, "--fold", "3", "--splits-dir", str(moved)]
    assert build.main(argv) == 0
    meta = records.load_metadata(out, "rmd17_uracil", "test")
    assert meta["num_records"] == len(test_idx) and meta["fold"] == "03"
    files = {os.path.basename(f["path"]): f["sha256"] for f in meta["source_files"]}
    assert files == {name: sha256_file(os.path.join(d, name)) for d, name in (
        (os.path.dirname(path), "rmd17_uracil.npz"), (moved, "index_train_03.csv"), (moved, "index_test_03.csv"))}
    for bad in (["--fold", "1", "2"], ["--splits-dir", str(moved)], ["--fold", "6"]):
        assert build.main(["--source", "rmd17", "--input", path, "--output", out, *bad]) == 2
    assert build.main(["--source", "md22", "--input", path, "--output", out, "--fold", "1"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("case,match", [
    ("missing", "index_test_01.csv"),
    ("unreadable", "index_train_01.csv"),
    ("not_an_integer", r"index_test_01.csv: line 2"),
    ("out_of_range", r"index_test_01.csv: frame index 90 out of range .*rmd17_uracil.npz"),
    ("negative", r"index_train_01.csv: frame index -1"),
    ("duplicate", r"index_train_01.csv: frame index 7 listed 2 times"),
    ("overlap", r"index_train_01.csv and .*index_test_01.csv share 1"),
    ("too_few_train", r"index_train_01.csv: 50 train frames"),
    ("split_file_input", "rmd17_uracil_train_01.npz"),
])
def test_rmd17_fold_errors_name_the_file(tmp_path, case, match):
    train = list(range(RMD17_VAL + 10))
    test = list(range(70, 80))
    if case == "duplicate":
        train[3] = 7
    if case == "negative":
        train[0] = -1
    if case == "overlap":
        test[4] = 12
    if case == "out_of_range":
        test[-1] = 90
    if case == "too_few_train":
        train = train[:RMD17_VAL]
    path, splits_dir, _, _ = _write_rmd17_release(tmp_path, train=train, test=test)
    if case == "missing":
        os.remove(splits_dir / "index_test_01.csv")
    if case == "unreadable":
        (splits_dir / "index_train_01.csv").write_bytes(b"\xff\xfe\x00 not text")
    if case == "not_an_integer":
        (splits_dir / "index_test_01.csv").write_text("70\n7l\n72\n")
    if case == "split_file_input":
        path = str(tmp_path / "rmd17_uracil_train_01.npz")
        np.savez(path, nuclear_charges=np.array([1]), coords=np.zeros((60, 1, 3)), energies=np.zeros(60),
                 forces=np.zeros((60, 1, 3)))
    with pytest.raises(InputFormatError, match=match):
        _plans("rmd17", path, fold=1)


def test_rmd17_fold_matches_real_split_files(tmp_path):
    """A full file assembled from the real fold-01 train and test files, with index files
    pointing at them, splits exactly as the per-split files do; the sample folder is left untouched."""
    folder = data_path("rmd17")
    before = {n: sha256_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}
    split_files = {role: os.path.join(folder, f"rmd17_ethanol_{role}_01.npz") for role in ("train", "test")}
    loaded = {role: np.load(p) for role, p in split_files.items()}
    keys = ("coords", "energies", "forces")
    num = {role: loaded[role]["energies"].shape[0] for role in loaded}
    location = np.random.default_rng(7).permutation(num["train"] + num["test"])  # full-file frame of each
    index = {"train": location[:num["train"]], "test": location[num["train"]:]}
    full = {k: np.empty((location.shape[0],) + loaded["train"][k].shape[1:]) for k in keys}
    for role in loaded:
        for k in keys:
            full[k][index[role]] = loaded[role][k]
    root = tmp_path / "rmd17"
    (root / "npz_data").mkdir(parents=True)
    (root / "splits").mkdir()
    path = str(root / "npz_data" / "rmd17_ethanol.npz")
    np.savez(path, nuclear_charges=loaded["train"]["nuclear_charges"], **full)
    for role in index:
        (root / "splits" / f"index_{role}_01.csv").write_text("".join(f"{i}\n" for i in index[role]))
    fold = _plans("rmd17", path, fold=1)
    per_file = {**_plans("rmd17", split_files["train"]), **_plans("rmd17", split_files["test"])}
    for split, role in (("train", "train"), ("val", "train"), ("test", "test")):
        ours = _records(fold[("rmd17_ethanol", split)])
        theirs = _records(per_file[("rmd17_ethanol", split)])
        np.testing.assert_array_equal(_frame_ids(ours), index[role][_frame_ids(theirs)])
        np.testing.assert_array_equal(np.stack([r["forces"] for r in ours]), np.stack([r["forces"] for r in theirs]))
        assert [r["energy"] for r in ours] == [r["energy"] for r in theirs]
    assert {n: sha256_file(os.path.join(folder, n)) for n in sorted(os.listdir(folder))} == before
