"""OC20 / OC22 S2EF frames from the OCP LMDBs of pickled torch_geometric `Data` graphs.

Optional path: needs lmdb, torch and torch_geometric (`pip install -e .[ocp-lmdb]`), which
are imported only when such files are read. Unpickling runs code named in the file: read
only LMDBs from a source you trust.

Layout (as written by the OCP/fairchem preprocessing): each `*.lmdb` is one LMDB file whose
keys are the ascii integers "0".."N-1", plus an optional "length" key holding the pickled
int N; without it the integer keys are read in numeric order. Each value is a pickled
`Data` with pos (N, 3) Å, atomic_numbers (N,) (stored as floats), cell (1, 3, 3) Å,
tags (N,), fixed (N,), energy in `energy` or `y` (eV, as stored), forces in `forces` or
`force` (eV/Å), and sid / fid. The LMDBs do not say which energy they hold: OC20's S2EF LMDBs
as OC20's docs make them (fairchem's preprocess_ef.py --ref-energy, what JMP trains on) hold
y = total energy - the system's reference energy, OC22's S2EF-Total LMDBs the total energy;
`DEFAULT_ENERGY_KIND` records that in the split metadata unless the caller says otherwise.
Objects pickled by PyG 1.x keep their fields directly in `__dict__`, those of PyG >= 2 under
`_store`; both are read.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

from jmp_jax.data.records import make_record
from data_prep.sources.common import ENERGY_FORCE_UNITS, InputFormatError, SplitPlan

LMDB_SUFFIX = ".lmdb"
INSTALL_HINT = "pip install -e .[ocp-lmdb]"
LENGTH_KEY = b"length"
ENERGY_FIELDS = ("energy", "y")  # fairchem renamed OCP's `y` / `force`
FORCE_FIELDS = ("forces", "force")
DEFAULT_ENERGY_KIND = {"oc20": "referenced", "oc22": "total"}


def import_lmdb(path: str):
    """The `lmdb` module, after checking that torch_geometric (needed to unpickle) imports.

    Raises InputFormatError naming `path` and the install command when either is missing.
    """
    try:
        import lmdb
        import torch  # noqa: F401  (the pickled tensors)
        import torch_geometric  # noqa: F401  (the pickled Data class)
    except ImportError as err:
        raise InputFormatError(
            f"{path}: OCP LMDBs hold pickled torch_geometric graphs; reading them needs lmdb, torch and "
            f"torch_geometric ({err}). Install them with `{INSTALL_HINT}`, or convert to extxyz/ASE files"
        ) from err
    return lmdb


def _open(lmdb, path: str):
    try:
        return lmdb.open(path, subdir=False, readonly=True, lock=False)
    except lmdb.Error as err:
        raise InputFormatError(f"{path}: cannot open as an LMDB file ({type(err).__name__}: {err})") from err


def _frame_keys(txn, path: str) -> list[bytes]:
    """Keys of the frames in stored order: "0".."length-1", or every integer key by value."""
    length = txn.get(LENGTH_KEY)
    if length is not None:
        try:
            count = int(pickle.loads(length))
        except Exception as err:  # any unpickling failure means a damaged length entry
            raise InputFormatError(f"{path}: key 'length' does not hold a pickled int ({err})") from err
        return [str(index).encode("ascii") for index in range(count)]
    keys = [key for key in txn.cursor().iternext(values=False) if key.isdigit()]
    return sorted(keys, key=int)


def graph_fields(graph, where: str) -> dict:
    """The data fields of an unpickled `Data` (PyG 1.x or >= 2 layout) as a plain dict."""
    state = getattr(graph, "__dict__", None)
    if state is None:
        raise InputFormatError(f"{where}: holds a {type(graph).__name__}, not a torch_geometric Data graph")
    if "_store" in state:
        state = dict(state["_store"])
    return {k: v for k, v in state.items() if v is not None and not k.startswith("_")}


def _array(value) -> np.ndarray:
    """Tensor / array / number -> numpy array (CPU tensors support the array protocol)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return np.asarray(value)


def _scalar(value, name: str, where: str):
    array = _array(value)
    if array.size != 1:
        raise InputFormatError(f"{where}: {name} has {array.size} values, expected one")
    return array.reshape(-1)[0].item()


def _first(fields: dict, names: tuple[str, ...]):
    return next((fields[name] for name in names if name in fields), None)


def graph_to_record(fields: dict, where: str) -> dict:
    """Fields of one OCP graph -> record dict; `where` ("<file>:<key>") starts its source_id."""
    missing = [name for name in ("pos", "atomic_numbers") if name not in fields]
    if missing:
        raise InputFormatError(f"{where}: graph has no {missing} (fields: {sorted(fields)})")
    numbers = np.rint(_array(fields["atomic_numbers"]).reshape(-1))
    num_atoms = numbers.shape[0]
    cell = fields.get("cell")
    energy, forces = _first(fields, ENERGY_FIELDS), _first(fields, FORCE_FIELDS)
    source_id = where + "".join(
        f",{name}={_scalar(fields[name], name, where)}" for name in ("sid", "fid") if name in fields
    )
    return make_record(
        numbers,
        _array(fields["pos"]).reshape(-1, 3),
        source_id=source_id,
        cell=None if cell is None else _array(cell).reshape(3, 3),
        pbc=cell is not None,
        tags=_array(fields.get("tags", np.zeros(num_atoms))),
        fixed=_array(fields.get("fixed", np.zeros(num_atoms))) != 0,
        energy=None if energy is None else _scalar(energy, "energy", where),
        forces=None if forces is None else _array(forces).reshape(-1, 3),
    )


def _file_records(lmdb, path: str):
    env = _open(lmdb, path)
    stem = os.path.basename(path)
    try:
        with env.begin() as txn:
            for key in _frame_keys(txn, path):
                where = f"{stem}:{key.decode('ascii')}"
                value = txn.get(key)
                if value is None:
                    raise InputFormatError(f"{path}: key {key.decode('ascii')!r} missing (the 'length' key counts it)")
                try:
                    graph = pickle.loads(value)
                except Exception as err:  # unpickling raises many types; name file and key
                    raise InputFormatError(
                        f"{path}: key {key.decode('ascii')!r} is not a pickled graph ({type(err).__name__}: {err})"
                    ) from err
                yield graph_to_record(graph_fields(graph, where), where)
    finally:
        env.close()


def _records(lmdb, files: list[str]):
    for path in files:
        yield from _file_records(lmdb, path)


def split_plan(files: list[str], *, source: str, split: str, energy_kind: str | None = None) -> SplitPlan:
    """One split of every frame of the LMDB `files`, file by file, in key order; `energy_kind` says which
    energy they hold (default: `DEFAULT_ENERGY_KIND` of the source).

    Checks the optional dependencies now, so that a missing one fails before any output.
    """
    lmdb = import_lmdb(files[0])
    return SplitPlan(source, split, lambda: _records(lmdb, files), dict(ENERGY_FORCE_UNITS), files,
                     energy_kind=energy_kind or DEFAULT_ENERGY_KIND.get(source, "total"))
