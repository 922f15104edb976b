"""rMD17 and MD22 npz files (energies kcal/mol, forces kcal/mol/Å -> eV, eV/Å).

rMD17 (`rmd17_<molecule>.npz`: nuclear_charges, coords, energies, forces): JMP shuffles all
frames with seed 42 and takes 950 train / 50 val / the rest test. The author's official
split files (`rmd17_<molecule>_{train,test}_<k>.npz`, 1,000 frames each) are also read:
a train file gives train (all but 50) and val (50) by the same seeded shuffle, a test file
gives test in file order. With `fold=K` a full file is split by the release's own index files
(`rmd17/splits/index_{train,test}_0K.csv` beside `rmd17/npz_data/`): train/val from the train
indices by that same shuffle of file positions, so both forms of one fold give the same val
frames; test is the test indices in file order. (JMP itself never reads these files: its rMD17
fine-tuning uses only the seed-42 split of all frames.)
MD22 (`md22_<molecule>.npz`: z, R, E, F): seed-42 shuffle, per-molecule train size of which
5% is val, the rest test (JMP datasets/finetune/md22.py).
"""
from __future__ import annotations

import os
import re
import zipfile

import numpy as np

from data_prep import splits as splits_lib
from jmp_jax.data.records import make_record
from data_prep.sources.common import ENERGY_FORCE_UNITS, KCAL_MOL_EV, InputFormatError, SplitPlan, require_file

RMD17_VAL = 50
RMD17_FOLDS = (1, 2, 3, 4, 5)
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


def _plans_from_arrays(name, path, arrays, split_indices, extra, index_files=()) -> list[SplitPlan]:
    z, positions, energies, forces = arrays
    stem = os.path.basename(path)
    units = dict(ENERGY_FORCE_UNITS, source_energy_unit="kcal/mol", kcal_mol_to_eV=KCAL_MOL_EV)
    source_files = [path, *index_files]
    return [
        SplitPlan(name, split, lambda idx=idx: _frames(z, positions, energies, forces, idx, stem), units,
                  source_files, extra)
        for split, idx in split_indices.items()
    ]


def official_train_val(num_frames: int, path: str) -> dict[str, np.ndarray]:
    """Positions (into an official 1,000-frame train set read from `path`) of train (all but
    RMD17_VAL) and val (RMD17_VAL), by the seeded shuffle."""
    if num_frames <= RMD17_VAL:
        raise InputFormatError(f"{path}: {num_frames} train frames; need more than the {RMD17_VAL} taken for val")
    split_indices = splits_lib.split_by_counts(num_frames, num_frames - RMD17_VAL, RMD17_VAL)
    del split_indices["test"]
    return split_indices


def index_file_paths(npz_path: str, fold: int, splits_dir: str | None = None) -> dict[str, str]:
    """{'train': …/index_train_0K.csv, 'test': …/index_test_0K.csv}; by default in the
    release's `splits/` folder, a sibling of the npz's `npz_data/` folder."""
    if fold not in RMD17_FOLDS:
        raise InputFormatError(f"{npz_path}: rMD17 official folds are {list(RMD17_FOLDS)}, got {fold}")
    if splits_dir is None:
        splits_dir = os.path.join(os.path.dirname(os.path.abspath(npz_path)), os.pardir, "splits")
    folder = os.path.normpath(splits_dir)
    return {role: require_file(os.path.join(folder, f"index_{role}_{fold:02d}.csv"),
                               f"rMD17 fold {fold} {role} index file (expected in {folder})")
            for role in ("train", "test")}


def read_index_file(path: str) -> np.ndarray:
    """(K,) int64 frame indices of a split index file: one integer per line, blank lines ignored."""
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InputFormatError(f"{path}: cannot read split index file ({err})") from err
    indices = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            indices.append(int(line))
        except ValueError:
            raise InputFormatError(f"{path}: line {number} is not a frame index: {line[:40]!r}") from None
    if not indices:
        raise InputFormatError(f"{path}: no frame indices")
    return np.asarray(indices, np.int64)


def check_fold_indices(indices: dict[str, np.ndarray], paths: dict[str, str], npz_path: str, num_frames: int):
    """Each role's indices lie in [0, num_frames), are distinct, and train and test are disjoint."""
    for role, idx in indices.items():
        outside = idx[(idx < 0) | (idx >= num_frames)]
        if outside.size:
            raise InputFormatError(f"{paths[role]}: frame index {outside[0]} out of range for "
                                   f"{npz_path} ({num_frames} frames)")
        values, counts = np.unique(idx, return_counts=True)
        if (counts > 1).any():
            raise InputFormatError(f"{paths[role]}: frame index {values[counts > 1][0]} listed "
                                   f"{counts.max()} times")
    shared = np.intersect1d(indices["train"], indices["test"])
    if shared.size:
        raise InputFormatError(f"{paths['train']} and {paths['test']} share {shared.size} frame indices "
                               f"(first {shared[0]})")


def official_fold_split(npz_path: str, num_frames: int, fold: int, splits_dir: str | None):
    """Frame indices {train, val, test} of one official fold, and the index files read."""
    paths = index_file_paths(npz_path, fold, splits_dir)
    indices = {role: read_index_file(path) for role, path in paths.items()}
    check_fold_indices(indices, paths, npz_path, num_frames)
    positions = official_train_val(indices["train"].shape[0], paths["train"])
    split_indices = {split: indices["train"][pos] for split, pos in positions.items()}
    split_indices["test"] = indices["test"]
    return split_indices, paths


def rmd17_plans(input_path: str, *, source: str, fold: int | None = None, splits_dir: str | None = None,
                **_) -> list[SplitPlan]:
    """Plans for a full or per-split rMD17 npz; `fold` (1..5) splits a full file by the
    release's index files, found in `splits_dir` or ../splits beside the npz's folder."""
    match = RMD17_FILE.match(os.path.basename(input_path))
    if match is None:
        raise InputFormatError(
            f"{input_path}: expected rmd17_<molecule>.npz or rmd17_<molecule>_{{train,test}}_<k>.npz")
    role = match["role"]
    if fold is None and splits_dir is not None:
        raise InputFormatError(f"{input_path}: a splits folder is only used with an official fold (--fold K)")
    if fold is not None and role is not None:
        raise InputFormatError(f"{input_path}: already one split of fold {match['fold']}; "
                               "--fold needs the full rmd17_<molecule>.npz")
    data = load_npz(input_path, ("nuclear_charges", "coords", "energies", "forces"))
    arrays = (data["nuclear_charges"], data["coords"], data["energies"] * KCAL_MOL_EV, data["forces"] * KCAL_MOL_EV)
    n = arrays[1].shape[0]
    index_files = {}
    if fold is not None:
        split_indices, index_files = official_fold_split(input_path, n, fold, splits_dir)
        extra = {"official_split_file": False, "fold": f"{fold:02d}", "split_rule": "official_index_files",
                 "index_files": index_files}
    elif role is None:
        split_indices = splits_lib.rmd17_split(n)
        extra = {"official_split_file": False, "fold": None, "split_rule": "jmp_seed42_950_50_rest"}
    else:
        split_indices = official_train_val(n, input_path) if role == "train" else {"test": np.arange(n)}
        extra = {"official_split_file": True, "fold": match["fold"], "split_rule": "official_split_npz"}
    return _plans_from_arrays(f"{source}_{match['molecule']}", input_path, arrays, split_indices, extra,
                              tuple(index_files.values()))


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
