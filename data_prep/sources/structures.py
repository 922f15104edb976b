"""Crystal datasets stored as pymatgen Structure dicts, parsed without pymatgen.

MatBench (`matbench_<task>.json.gz`, pandas split-orient JSON {index, columns, data} whose
rows hold a Structure dict and the target): the official 5 folds (scikit-learn KFold, or
StratifiedKFold for a boolean target, shuffle=True, random_state=18012019, as matbench
generates them); per fold JMP shuffles train+val with seed 42 and keeps 90% for train.
Outputs `<source>_<task>_fold<k>` datasets with train/val/test splits.
QMOF (`qmof.json` + `qmof_structure_data.json`): target `bandgap` (outputs.pbe.bandgap, eV),
80/10/10 split of qmof.json's order with seed 42; a missing band gap is a NaN label.
Structures: cell = lattice.matrix (rows, Å), positions = sites[].xyz (or abc @ matrix),
Z from sites[].species[0].element, tags 2, fixed False.
"""
from __future__ import annotations

import gzip
import json
import os
import re

import numpy as np
from ase.data import atomic_numbers as SYMBOL_TO_Z

from data_prep import splits as splits_lib
from jmp_jax.data.records import make_record
from data_prep.sources.common import InputFormatError, SplitPlan, require_file


def structure_to_record(structure: dict, source_id: str, targets: dict) -> dict:
    """pymatgen Structure dict -> record dict; InputFormatError naming `source_id` if malformed."""
    try:
        lattice = structure["lattice"]
        cell = np.asarray(lattice["matrix"], np.float64).reshape(3, 3)
        sites = structure["sites"]
        z, positions = [], []
        for site in sites:
            species = site["species"]
            if len(species) != 1:
                raise ValueError(f"disordered site with species {species}")
            z.append(SYMBOL_TO_Z[re.sub(r"[^A-Za-z]", "", species[0]["element"])])
            positions.append(site["xyz"] if "xyz" in site else np.asarray(site["abc"]) @ cell)
    except (KeyError, TypeError, ValueError) as err:
        raise InputFormatError(
            f"structure {source_id!r}: not a pymatgen Structure dict ({type(err).__name__}: {err})") from err
    return make_record(
        z, np.asarray(positions, np.float64).reshape(-1, 3), cell=cell, pbc=lattice.get("pbc", True),
        source_id=source_id, targets=targets,
    )


def _load_json(path: str, opener=open):
    require_file(path, "JSON file")
    try:
        with opener(path, "rt") as f:
            return json.load(f)
    except (OSError, ValueError, EOFError) as err:
        raise InputFormatError(f"{path}: cannot read as JSON ({err})") from err


def target_name(column: str) -> str:
    """'log10(G_VRH)' -> 'log10_g_vrh': a plain feature name for a MatBench target column."""
    return re.sub(r"[^0-9a-z]+", "_", column.lower()).strip("_")


def matbench_plans(input_path: str, *, source: str, folds=None, **_) -> list[SplitPlan]:
    table = _load_json(input_path, gzip.open if input_path.endswith(".gz") else open)
    if not isinstance(table, dict) or not {"index", "columns", "data"} <= table.keys():
        raise InputFormatError(f"{input_path}: expected pandas split-orient JSON with index/columns/data")
    columns = table["columns"]
    if "structure" not in columns or len(columns) != 2:
        raise InputFormatError(f"{input_path}: expected columns ['structure', <target>], got {columns}")
    s_col = columns.index("structure")
    column = columns[1 - s_col]
    ids, rows = table["index"], table["data"]
    values = [row[1 - s_col] for row in rows]
    is_classification = all(isinstance(v, bool) for v in values)
    fold_tests = (splits_lib.stratified_kfold_test_indices(values) if is_classification
                  else splits_lib.kfold_test_indices(len(rows)))
    name = target_name(column)
    task = os.path.basename(input_path).split(".")[0].removeprefix("matbench_")

    def records(indices):
        for i in indices:
            yield structure_to_record(rows[i][s_col], str(ids[i]), {name: float(values[i])})

    out = []
    for fold in range(len(fold_tests)) if folds is None else folds:
        split_indices = splits_lib.matbench_fold_split(len(rows), fold_tests[fold])
        extra = {"task": task, "fold": fold, "target_column": column, "classification": is_classification}
        out += [
            SplitPlan(f"{source}_{task}_fold{fold}", split, lambda idx=idx: records(idx),
                      {"positions": "angstrom", "cell": "angstrom"}, [input_path], extra)
            for split, idx in split_indices.items()
        ]
    return out


def qmof_plans(input_path: str, *, source: str, **_) -> list[SplitPlan]:
    folder = input_path if os.path.isdir(input_path) else os.path.dirname(input_path)
    props_path = os.path.join(folder, "qmof.json")
    structs_path = os.path.join(folder, "qmof_structure_data.json")
    systems = _load_json(props_path)
    structures = {entry["qmof_id"]: entry["structure"] for entry in _load_json(structs_path)}
    missing = [s["qmof_id"] for s in systems if s["qmof_id"] not in structures]
    if missing:
        raise InputFormatError(f"{structs_path}: no structure for qmof ids {missing[:5]} (of {len(missing)})")

    def records(indices):
        for i in indices:
            system = systems[i]
            gap = system.get("outputs", {}).get("pbe", {}).get("bandgap")
            yield structure_to_record(structures[system["qmof_id"]], system["qmof_id"],
                                      {"bandgap": np.nan if gap is None else gap})

    units = {"positions": "angstrom", "cell": "angstrom", "bandgap": "eV"}
    return [
        SplitPlan(source, split, lambda idx=idx: records(idx), units, [props_path, structs_path])
        for split, idx in splits_lib.split_by_fractions(len(systems)).items()
    ]
