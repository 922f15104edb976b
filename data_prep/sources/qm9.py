"""QM9 from the `qm9pack` package CSVs (qm9pack/data/qm9_part{1,2,3}.csv: 130,831 molecules,
raw units Hartree / Debye / bohr), converted to the 12 targets JMP fine-tunes on.

Target names and units follow JMP's PyG-derived QM9: mu [D], alpha [bohr^3], eps_HOMO,
eps_LUMO, delta_eps [eV], R_2_Abs [bohr^2], ZPVE, U_0, U, H, G [eV], c_v [cal/mol/K].
ZPVE, U_0, U, H, G and c_v have JMP's per-element references subtracted
(Σ_atoms ref[Z], tasks/finetune/dataset_config.py). Molecules are ordered by their GDB
index; split: seed-42 shuffle, 10,000 val, 10,000 test, the rest train.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re

import numpy as np

from data_prep import splits as splits_lib
from jmp_jax.data.records import make_record
from data_prep.sources.common import HARTREE_EV, InputFormatError, SplitPlan

CSV_NAMES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
SYMBOL_TO_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
# Coordinates are written like "[[0.5995394918,0.,1.],...]" (not JSON), some with
# Mathematica exponents ("1.2*^-6", from the raw QM9 xyz files).
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")

# target -> (CSV column, factor to JMP units, unit)
TARGETS = {
    "mu": ("Dipole_debye", 1.0, "debye"),
    "alpha": ("Polarizability_bohr3", 1.0, "bohr^3"),
    "eps_HOMO": ("HOMO_au", HARTREE_EV, "eV"),
    "eps_LUMO": ("LUMO_au", HARTREE_EV, "eV"),
    "delta_eps": ("HOMO_LUMO_gap_au", HARTREE_EV, "eV"),
    "R_2_Abs": ("R2_bohr2", 1.0, "bohr^2"),
    "ZPVE": ("ZPVE_au", HARTREE_EV, "eV"),
    "U_0": ("InternalEnergy_0K_au", HARTREE_EV, "eV"),
    "U": ("InternalEnergy_298K_au", HARTREE_EV, "eV"),
    "H": ("Enthalphy_298K_au", HARTREE_EV, "eV"),
    "G": ("GibbsFreeEnergy_298K_au", HARTREE_EV, "eV"),
    "c_v": ("Heatcapacity_Cv_cal_mol_K", 1.0, "cal/mol/K"),
}

# JMP's per-element references for H, C, N, O, F (Z = 1, 6, 7, 8, 9); other Z have ~0 there.
ATOM_REFS = {
    "ZPVE": {1: 3.1213e-01, 6: 1.3694e-01, 7: 1.3955e-01, 8: 1.1424e-01, 9: 9.3038e-02},
    "U_0": {1: -1.6430e01, 6: -1.0360e03, 7: -1.4898e03, 8: -2.0470e03, 9: -2.7175e03},
    "U": {1: -1.6419e01, 6: -1.0360e03, 7: -1.4898e03, 8: -2.0470e03, 9: -2.7175e03},
    "H": {1: -1.6419e01, 6: -1.0360e03, 7: -1.4898e03, 8: -2.0470e03, 9: -2.7175e03},
    "G": {1: -1.6443e01, 6: -1.0361e03, 7: -1.4899e03, 8: -2.0471e03, 9: -2.7176e03},
    "c_v": {1: 1.2409e00, 6: 2.0350e00, 7: 2.7877e00, 8: 3.0860e00, 9: 3.3401e00},
}


def csv_paths(input_path: str | None) -> list[str]:
    """The three part CSVs in `input_path`, or in the installed qm9pack package if None/'qm9pack'."""
    if input_path in (None, "", "qm9pack"):
        spec = importlib.util.find_spec("qm9pack")  # not imported: its __init__ needs pkg_resources
        if spec is None or not spec.submodule_search_locations:
            raise InputFormatError("qm9pack is not installed (pip install qm9pack==1.0.3)")
        input_path = os.path.join(list(spec.submodule_search_locations)[0], "data")
    paths = [os.path.join(input_path, name) for name in CSV_NAMES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputFormatError(f"{input_path}: missing QM9 CSVs {missing}")
    return paths


def parse_row(row: dict, path: str) -> tuple[int, dict]:
    """(GDB index, record) from one CSV row; InputFormatError names file and index on bad rows."""
    try:
        symbols = json.loads(row["Elements"].replace("'", '"'))
        z = np.array([SYMBOL_TO_Z[s] for s in symbols], np.int64)
        positions = np.array(NUMBER.findall(row["XYZ_Ang"].replace("*^", "e")), np.float64).reshape(z.shape[0], 3)
        targets = {}
        for name, (column, factor, _) in TARGETS.items():
            value = float(row[column]) * factor
            refs = ATOM_REFS.get(name)
            targets[name] = value - sum(refs[int(a)] for a in z) if refs else value
        index = int(row["Index"])
    except (KeyError, ValueError, TypeError) as err:
        raise InputFormatError(f"{path}: bad QM9 row {row.get('Index', '?')} ({type(err).__name__}: {err})") from err
    return index, make_record(z, positions, targets=targets, source_id=f"gdb_{index}")


def load_molecules(paths: list[str]) -> list[dict]:
    """All molecules of the CSVs, sorted by GDB index (the order JMP's split indices refer to)."""
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            rows.extend(parse_row(row, path) for row in csv.DictReader(f))
    rows.sort(key=lambda item: item[0])
    return [record for _, record in rows]


def plans(input_path: str | None, *, source: str, qm9_holdout: int = 10_000, **_) -> list[SplitPlan]:
    """`qm9_holdout` molecules each for val and test (JMP: 10,000)."""
    paths = csv_paths(input_path)
    molecules = load_molecules(paths)
    indices = splits_lib.qm9_split(len(molecules), qm9_holdout)
    units = {"positions": "angstrom", **{name: unit for name, (_, _, unit) in TARGETS.items()}}
    extra = {"atom_refs_subtracted": {k: {str(z): v for z, v in refs.items()} for k, refs in ATOM_REFS.items()}}
    return [
        SplitPlan(source, split, lambda idx=indices[split]: (molecules[i] for i in idx), units, paths, extra)
        for split in splits_lib.SPLITS
    ]
