"""ANI-1x-like molecules: QM9 molecules from the `qm9pack` package, rattled, labelled by GFN2-xTB (tblite)."""
from __future__ import annotations

import ast
import contextlib
import csv
import ctypes
import functools
import importlib.util
import json
import os
from typing import Iterator

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculationFailed, InputError

from data_prep.synthetic import DefaultDatasetError, structure_record


QM9_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


def _qm9_data_dir() -> str:
    """The qm9pack data folder, found without importing qm9pack (its __init__ needs pkg_resources and pandas)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultDatasetError("package 'qm9pack' not found: pip install qm9pack==1.0.3")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def qm9_files() -> list[str]:
    """The QM9 CSV files the molecule and reaction domains are drawn from (hashed into the split metadata)."""
    return [os.path.join(_qm9_data_dir(), name) for name in QM9_FILES]


def _load_qm9(rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """QM9 molecules at the given 0-based rows, in that order: (qm9 index, numbers (N,), positions (N,3) Å).

    The CSVs hold one molecule per line, so only the wanted lines go through the (slow) csv parser.
    """
    wanted, found, row = {int(r) for r in rows}, {}, 0
    for name in QM9_FILES:
        path = os.path.join(_qm9_data_dir(), name)
        with open(path, newline="") as handle:
            header = next(csv.reader([handle.readline()]))
            col = {key: header.index(key) for key in ("Index", "Elements", "XYZ_Ang")}
            for line in handle:
                if row in wanted:
                    fields = next(csv.reader([line]))
                    if len(fields) != len(header):
                        raise DefaultDatasetError(f"{path}: molecule row {row} has {len(fields)} fields, "
                                                  f"expected {len(header)}")
                    atoms = Atoms(ast.literal_eval(fields[col["Elements"]]),
                                  positions=json.loads(fields[col["XYZ_Ang"]]))
                    found[row] = (int(fields[col["Index"]]), atoms.numbers, atoms.positions)
                row += 1
    missing = sorted(wanted - set(found))
    if missing:
        raise DefaultDatasetError(f"qm9pack CSVs in {_qm9_data_dir()} lack rows {missing[:5]}")
    return [found[int(r)] for r in rows]


def qm9_pool(seed: int, domain_id: int, n_groups: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Distinct random QM9 molecules for a domain, with slack for groups dropped on xTB failures."""
    total = 0  # one line per molecule plus a header per file
    for name in QM9_FILES:
        with open(os.path.join(_qm9_data_dir(), name), "rb") as handle:
            total += sum(1 for _ in handle) - 1
    # stream [seed, 10 + domain] cannot coincide with the per-group streams [seed, domain, k]
    rows = np.random.default_rng([seed, 10 + domain_id]).choice(total, size=min(total, int(1.3 * n_groups) + 8),
                                                                replace=False)
    return _load_qm9(rows)


@functools.lru_cache(maxsize=1)


def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime tblite links against (None where there is none, e.g. macOS)."""
    try:
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None


@contextlib.contextmanager


def _one_openmp_thread():
    """Runs the block with one OpenMP thread, then restores the previous count. tblite's threads spin-wait:
    on a busy 2-core machine one thread took 0.03 s per QM9 molecule, two threads 1.3 s (measured)."""
    gomp = _gnu_openmp()
    if gomp is None:
        yield
        return
    previous = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(previous)


def xtb_label(numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray] | None:
    """GFN2-xTB (tblite) energy (eV) and forces (N,3) eV/Å of a neutral molecule; None if xTB fails."""
    from tblite.ase import TBLite  # imported here so that catalysis-only use needs no tblite

    atoms = Atoms(numbers, positions=positions)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    try:
        with _one_openmp_thread():
            return atoms.get_potential_energy(), atoms.get_forces()
    except (CalculationFailed, InputError):  # SCF failure or a geometry tblite rejects
        return None


def label_group(numbers, frames, ids) -> list[dict] | None:
    """xTB-label every frame (F,N,3) of one group; None if any frame fails, so the group is dropped whole.

    Molecular records: no PBC, zero cell, all tags 2, nothing fixed (docs/jmp_spec.md §2.2).
    """
    group, n = [], len(numbers)
    for positions, source_id in zip(frames, ids):
        label = xtb_label(numbers, positions)
        if label is None:
            return None
        atoms = Atoms(numbers, positions=positions)
        group.append(structure_record(atoms, np.full(n, 2), np.zeros(n, bool), *label, source_id))
    return group


def molecule_groups(seed: int, group_size: int, pool) -> Iterator[list[dict]]:
    """Groups of group_size Gaussian-rattled conformers (sigma 0.02-0.08 Å) of one QM9 molecule."""
    for k, (index, numbers, positions) in enumerate(pool):
        rng = np.random.default_rng([seed, 1, k])
        sigmas = rng.uniform(0.02, 0.08, size=group_size)
        frames = positions + rng.normal(size=(group_size, *positions.shape)) * sigmas[:, None, None]
        group = label_group(numbers, frames, [f"molecules/qm9_{index:06d}/{c}" for c in range(group_size)])
        if group is not None:
            yield group
