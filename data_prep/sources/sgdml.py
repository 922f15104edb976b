"""rMD17 and MD22 npz files (energies kcal/mol, forces kcal/mol/Å -> eV, eV/Å).

rMD17 (`rmd17_<molecule>.npz`: nuclear_charges, coords, energies, forces): JMP shuffles all
frames with seed 42 and takes 950 train / 50 val / the rest test. The author's official
split files (`rmd17_<molecule>_{train,test}_<k>.npz`, 1,000 frames each) are also read:
a train file gives train (all but 50) and val (50) by the same seeded shuffle, a test file
gives test in file order.
MD22 (`md22_<molecule>.npz`: z, R, E, F): seed-42 shuffle, per-molecule train size of which
5% is val, the rest test (JMP datasets/finetune/md22.py).
"""
from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from data_prep import splits as splits_lib
from data_prep.records import make_record
from data_prep.sources.common import ENERGY_FORCE_UNITS, KCAL_MOL_EV, InputFormatError, SplitPlan, require_file

RMD17_VAL = 50
RMD17_FILE = re.compile(r"^rmd17_(?P<molecule>.+?)(?:_(?P<role>train|test)_(?P<fold>\d+))?\.npz$")
MD22_TRAIN_SIZES = {
    "Ac-Ala3-NHMe": 6000,
    "DHA": 8000,
    "stachyose": 8000,
    "AT-AT": 3000,
    "AT-AT-CG-CG": 2000,
    "buckyball-catcher": 600,
    "double-walled_nanotube": 800,
}


def load_npz(path: str, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named arrays of an npz file; InputFormatError naming the file if unreadable."""
    require_file(path, "npz file")
    try:
        with np.load(path) as data:
            missing = [k for k in keys if k not in data.files]
            if missing:
                raise InputFormatError(f"{path}: npz lacks keys {missing} (has {data.files})")
            return {k: data[k] for k in keys}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        if isinstance(err, InputFormatError):
            raise
        raise InputFormatError(f"{path}: cannot read as npz ({err})") from err


def _frames(z, positions, energies, forces, indices, stem):
    """Records of the given frames; energies (F,), forces (F, N, 3) already in eV units."""
    for i in indices:
        yield make_record(z, positions[i], energy=energies[i], forces=forces[i], source_id=f"{stem}:{int(i)}")


def _plans_from_arrays(name, path, arrays, split_indices, extra) -> list[SplitPlan]:
    z, positions, energies, forces = arrays
    stem = os.path.basename(path)
    units = dict(ENERGY_FORCE_UNITS, source_energy_unit="kcal/mol", kcal_mol_to_eV=KCAL_MOL_EV)
    return [
        SplitPlan(name, split, lambda idx=idx: _frames(z, positions, energies, forces, idx, stem), units, [path], extra)
        for split, idx in split_indices.items()
    ]


def rmd17_plans(input_path: str, *, source: str, **_) -> list[SplitPlan]:
    match = RMD17_FILE.match(os.path.basename(input_path))
    if match is None:
        raise InputFormatError(
            f"{input_path}: expected rmd17_<molecule>.npz or rmd17_<molecule>_{{train,test}}_<k>.npz")
    data = load_npz(input_path, ("nuclear_charges", "coords", "energies", "forces"))
    arrays = (data["nuclear_charges"], data["coords"], data["energies"] * KCAL_MOL_EV, data["forces"] * KCAL_MOL_EV)
    n = arrays[1].shape[0]
    role = match["role"]
    if role is None:
        split_indices = splits_lib.rmd17_split(n)
    elif role == "train":
        split_indices = splits_lib.split_by_counts(n, n - RMD17_VAL, RMD17_VAL)
        del split_indices["test"]
    else:
        split_indices = {"test": np.arange(n)}
    extra = {"official_split_file": role is not None, "fold": match["fold"]}
    return _plans_from_arrays(f"{source}_{match['molecule']}", input_path, arrays, split_indices, extra)


def md22_plans(input_path: str, *, source: str, **_) -> list[SplitPlan]:
    name = os.path.basename(input_path)
    molecule = name[len("md22_"):-len(".npz")] if name.startswith("md22_") and name.endswith(".npz") else None
    if molecule not in MD22_TRAIN_SIZES:
        raise InputFormatError(
            f"{input_path}: expected md22_<molecule>.npz with molecule in {sorted(MD22_TRAIN_SIZES)}")
    data = load_npz(input_path, ("z", "R", "E", "F"))
    energies = data["E"].reshape(-1) * KCAL_MOL_EV
    arrays = (data["z"], data["R"], energies, data["F"] * KCAL_MOL_EV)
    split_indices = splits_lib.md22_split(energies.shape[0], MD22_TRAIN_SIZES[molecule])
    return _plans_from_arrays(f"{source}_{molecule}", input_path, arrays, split_indices, {})
