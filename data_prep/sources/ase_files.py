"""OC20 / OC22 S2EF frames from ASE-readable files (extxyz, ASE db/json, traj, vasprun.xml).

Input: one file or a folder of them (read in natural name order). Forces eV/Å without
constraints applied, tags from atoms.get_tags(), fixed from FixAtoms constraints.
Energies (eV): OC20's S2EF extxyz release ships a `<n>.txt` beside each `<n>.extxyz` with
"system_id,frame_number,reference_energy" per frame (the system's clean-slab + gas-phase
reference). Its ids become the source_id, and the energy is referenced, E - reference, as in
the OCP LMDBs that fairchem's preprocess_ef.py --ref-energy writes from the same files and JMP
trains on; the reference stays as the `reference_energy` target (total = energy + it). Other
files (OC22, or OC20 without the .txt) keep the DFT total energy as stored. The split metadata
records which (`energy_kind`); a split mixing files with and without references is an error.
A file or folder of the OCP code's `*.lmdb` (pickled torch_geometric graphs) is handed to
data_prep.sources.ocp_lmdb, which needs the optional `ocp-lmdb` extra.
"""
from __future__ import annotations

import os
import re

import numpy as np

from jmp_jax.data.records import make_record
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


def _reference_file(path: str) -> str | None:
    """OC20's per-frame reference energies `<stem>.txt` beside the extxyz `path`, if present."""
    txt = os.path.splitext(path)[0] + ".txt"
    return txt if path.endswith(".extxyz") and os.path.isfile(txt) else None


def files_energy_kind(files: list[str]) -> str:
    """"referenced" when every file has its OC20 reference energies beside it, "total" when none has."""
    with_references = [path for path in files if _reference_file(path)]
    if not with_references:
        return "total"
    without = next((path for path in files if not _reference_file(path)), None)
    if without is not None:
        raise InputFormatError(f"{without}: has no OC20 reference energies (<stem>.txt) but {with_references[0]} "
                               "has; a split must hold only total or only referenced energies")
    return "referenced"


def _oc20_frame_info(path: str, num_frames: int) -> list[tuple[str, float]] | None:
    """(source_id, reference_energy) per frame from the OC20 `<stem>.txt` beside `path`."""
    txt = _reference_file(path)
    if txt is None:
        return None
    rows = [line.strip().split(",") for line in open(txt) if line.strip()]
    if len(rows) != num_frames or any(len(row) != 3 for row in rows):
        raise InputFormatError(f"{txt}: expected {num_frames} lines 'system_id,frame,reference_energy'")
    return [(f"{row[0]},{row[1]}", float(row[2])) for row in rows]


def atoms_to_record(atoms, source_id: str, reference_energy: float | None = None) -> dict:
    """ase.Atoms (with an optional single-point calculator) -> record dict; with a `reference_energy` the
    energy is referenced (E - it) and the reference kept as a target."""
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
        energy=atoms.get_potential_energy() - (reference_energy or 0.0) if "energy" in results else None,
        forces=atoms.get_forces(apply_constraint=False) if "forces" in results else None,
        targets=None if reference_energy is None else {"reference_energy": reference_energy},
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
                yield atoms_to_record(atoms, *info[index])


def plans(input_path: str, *, source: str, split: str | None, energy_kind: str | None = None,
          **_) -> list[SplitPlan]:
    """OC20/OC22 inputs are distributed per split: `split` names the one this input holds. `energy_kind`
    says which energy OCP LMDBs hold (ocp_lmdb.DEFAULT_ENERGY_KIND); ASE files tell it themselves."""
    if not split:
        raise InputFormatError(f"{input_path}: {source} input is one distributed split; pass --split NAME")
    files = list_input_files(input_path)
    lmdb_files = [path for path in files if path.endswith(ocp_lmdb.LMDB_SUFFIX)]
    if lmdb_files and len(lmdb_files) != len(files):
        raise InputFormatError(f"{input_path}: holds both OCP LMDBs and ASE-readable files; give one kind per split")
    if lmdb_files:
        return [ocp_lmdb.split_plan(files, source=source, split=split, energy_kind=energy_kind)]
    if energy_kind is not None:
        raise InputFormatError(f"{input_path}: --energy-kind applies to OCP LMDB input only; ASE files hold "
                               "total energies, referenced where OC20's <stem>.txt reference energies are beside")
    kind = files_energy_kind(files)
    units = dict(ENERGY_FORCE_UNITS, **({"reference_energy": "eV"} if kind == "referenced" else {}))
    return [SplitPlan(source, split, lambda: _records(files), units, files, energy_kind=kind)]
