"""OC20 / OC22 S2EF frames from ASE-readable files (extxyz, ASE db/json, traj, vasprun.xml).

Input: one file or a folder of them (read in natural name order). Energies are the DFT
total energies as stored (eV), forces eV/Å without constraints applied, tags from
atoms.get_tags(), fixed from FixAtoms constraints. OC20 S2EF folders ship a `<n>.txt`
beside each `<n>.extxyz` with "system_id,frame,reference_energy" per frame: its ids become
the source_id and the reference energy the `reference_energy` target (y = energy - it).
A file or folder of the OCP code's `*.lmdb` (pickled torch_geometric graphs) is handed to
data_prep.sources.ocp_lmdb, which needs the optional `ocp-lmdb` extra.
"""
from __future__ import annotations

import os
import re

import numpy as np

from data_prep.records import make_record
from data_prep.sources import ocp_lmdb
from data_prep.sources.common import ENERGY_FORCE_UNITS, InputFormatError, SplitPlan

SUFFIXES = (".extxyz", ".xyz", ".db", ".json", ".traj", ".xml", ocp_lmdb.LMDB_SUFFIX)


def _natural_key(path: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(path))]


def list_input_files(input_path: str) -> list[str]:
    """The structure files named by `input_path` (a file, or a folder of them)."""
    if os.path.isfile(input_path):
        return [input_path]
    if not os.path.isdir(input_path):
        raise InputFormatError(f"{input_path}: no such file or folder")
    files = [
        os.path.join(input_path, name)
        for name in os.listdir(input_path)
        if name.endswith(SUFFIXES) and (not name.endswith(".xml") or "vasprun" in name)
    ]
    if not files:
        raise InputFormatError(f"{input_path}: no structure files ({', '.join(SUFFIXES)})")
    return sorted(files, key=_natural_key)


def _read_frames(path: str):
    import ase.io

    try:
        frames = ase.io.read(path, index=":")
    except Exception as err:  # ase raises many types for a bad file; name the file
        raise InputFormatError(f"{path}: cannot read with ase.io.read ({type(err).__name__}: {err})") from err
    if not frames:
        raise InputFormatError(f"{path}: ase.io.read found no structures in it")
    return frames


def _oc20_frame_info(path: str, num_frames: int) -> list[tuple[str, float]] | None:
    """(source_id, reference_energy) per frame from the OC20 `<stem>.txt` beside `path`."""
    txt = os.path.splitext(path)[0] + ".txt"
    if not path.endswith(".extxyz") or not os.path.isfile(txt):
        return None
    rows = [line.strip().split(",") for line in open(txt) if line.strip()]
    if len(rows) != num_frames or any(len(row) != 3 for row in rows):
        raise InputFormatError(f"{txt}: expected {num_frames} lines 'system_id,frame,reference_energy'")
    return [(f"{row[0]},{row[1]}", float(row[2])) for row in rows]


def atoms_to_record(atoms, source_id: str, targets: dict | None = None) -> dict:
    """ase.Atoms (with an optional single-point calculator) -> record dict."""
    from ase.constraints import FixAtoms

    fixed = np.zeros(len(atoms), bool)
    for constraint in atoms.constraints:
        if isinstance(constraint, FixAtoms):
            fixed[constraint.index] = True
    results = atoms.calc.results if atoms.calc is not None else {}
    return make_record(
        atoms.get_atomic_numbers(),
        atoms.get_positions(),
        source_id=source_id,
        cell=atoms.cell.array,
        pbc=atoms.pbc,
        tags=atoms.get_tags(),
        fixed=fixed,
        energy=atoms.get_potential_energy() if "energy" in results else None,
        forces=atoms.get_forces(apply_constraint=False) if "forces" in results else None,
        targets=targets,
    )


def _records(files: list[str]):
    for path in files:
        frames = _read_frames(path)
        info = _oc20_frame_info(path, len(frames))
        stem = os.path.basename(path)
        for index, atoms in enumerate(frames):
            if info is None:
                yield atoms_to_record(atoms, f"{stem}:{index}")
            else:
                source_id, reference = info[index]
                yield atoms_to_record(atoms, source_id, {"reference_energy": reference})


def plans(input_path: str, *, source: str, split: str | None, **_) -> list[SplitPlan]:
    """OC20/OC22 inputs are distributed per split: `split` names the one this input holds."""
    if not split:
        raise InputFormatError(f"{input_path}: {source} input is one distributed split; pass --split NAME")
    files = list_input_files(input_path)
    lmdb_files = [path for path in files if path.endswith(ocp_lmdb.LMDB_SUFFIX)]
    if lmdb_files and len(lmdb_files) != len(files):
        raise InputFormatError(f"{input_path}: holds both OCP LMDBs and ASE-readable files; give one kind per split")
    if lmdb_files:
        return [ocp_lmdb.split_plan(files, source=source, split=split)]
    units = dict(ENERGY_FORCE_UNITS, reference_energy="eV")
    return [SplitPlan(source, split, lambda: _records(files), units, files)]
