"""Shared pieces of the dataset readers: unit constants, the split plan type, input errors."""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

# CODATA 2018 (exact SI definitions for e, N_A); JMP's own factors (e.g. 1/23.061 eV per
# kcal/mol) differ by up to 2e-5 relative, far below DFT label noise.
HARTREE_EV = 27.211386245988
BOHR_ANGSTROM = 0.529177210903
KCAL_MOL_EV = 4184.0 / (6.02214076e23 * 1.602176634e-19)  # 0.0433641043...

ENERGY_FORCE_UNITS = {"positions": "angstrom", "cell": "angstrom", "energy": "eV", "forces": "eV/angstrom"}


class InputFormatError(ValueError):
    """An input file is missing, unreadable, or not in the distributed layout; names the file."""


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """One output split: `records()` streams its record dicts (see jmp_jax.data.records)."""

    name: str  # output dataset name, e.g. "rmd17_ethanol"
    split: str
    records: Callable[[], Iterator[dict]]
    units: dict
    source_files: list[str]
    extra_metadata: dict = dataclasses.field(default_factory=dict)
    energy_kind: str = "total"  # or "referenced": the distribution's per-system reference energy subtracted


def require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise InputFormatError(f"{path}: {what} not found")
    return path


def dataset_stem(path: str, prefix: str, suffixes: tuple[str, ...]) -> str:
    """'…/md22_AT-AT.npz' -> 'AT-AT' (file name less `prefix` and the first matching suffix)."""
    name = os.path.basename(path)
    for suffix in suffixes:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[len(prefix):] if name.startswith(prefix) else name


def open_h5(path: str):
    """h5py.File opened read-only; InputFormatError naming the file if it is not HDF5."""
    import h5py

    require_file(path, "HDF5 file")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise InputFormatError(f"{path}: cannot read as HDF5 ({err})") from err


def h5_dataset(group, key: str, path: str):
    """group[key] as an h5py Dataset, or InputFormatError naming file, group and key."""
    import h5py

    item = group.get(key)
    if not isinstance(item, h5py.Dataset):
        raise InputFormatError(f"{path}: group {group.name!r} has no dataset {key!r}")
    return item
