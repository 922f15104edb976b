"""Generators of the embedded default dataset's three domains (`data_prep/default_dataset.py` builds it):
`catalysis` (EMT-labelled adslabs), `molecules` (xTB-labelled QM9 conformers), `reactions` (xTB-labelled
QM9 reaction-like paths). Each yields groups of record dicts, deterministic given a seed."""
from __future__ import annotations

import numpy as np
from ase import Atoms


class DefaultDatasetError(ValueError):
    """Bad input to the default-dataset builder (unknown domain, bad size, missing package data)."""


def structure_record(atoms: Atoms, tags: np.ndarray, fixed: np.ndarray, energy: float, forces: np.ndarray,
            source_id: str) -> dict:
    """One structure as the record dict that data_prep.shard_writer.write_split consumes (N atoms)."""
    return {
        "atomic_numbers": atoms.numbers.astype(np.int64), "positions": atoms.positions.astype(np.float64),
        "cell": np.asarray(atoms.cell[:], np.float64), "pbc": atoms.pbc.astype(bool),
        "tags": tags.astype(np.int64), "fixed": fixed.astype(bool), "energy": float(energy),
        "forces": np.asarray(forces, np.float64), "source_id": source_id,
    }
