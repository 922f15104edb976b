"""Transition-1x HDF5 with its official train/val/test groups; labels already in eV.

Layout: {train,val,test}/<formula>/<rxn>/{atomic_numbers (N,), positions (C, N, 3) Å,
wB97x_6-31G(d).energy (C,) eV, wB97x_6-31G(d).forces (C, N, 3) eV/Å} plus reactant /
product / transition_state subgroups, which repeat frames of the path and are not read.
"""
from __future__ import annotations

from data_prep import splits as splits_lib
from jmp_jax.data.records import make_record
from data_prep.sources.common import ENERGY_FORCE_UNITS, InputFormatError, SplitPlan, h5_dataset, open_h5

ENERGY_KEY = "wB97x_6-31G(d).energy"
FORCES_KEY = "wB97x_6-31G(d).forces"


def _records(path: str, split: str):
    with open_h5(path) as f:
        for formula, reactions in f[split].items():
            for rxn, group in reactions.items():
                z = h5_dataset(group, "atomic_numbers", path)[()]
                positions = h5_dataset(group, "positions", path)[()]
                energies = h5_dataset(group, ENERGY_KEY, path)[()]
                forces = h5_dataset(group, FORCES_KEY, path)[()]
                for i in range(positions.shape[0]):
                    yield make_record(z, positions[i], energy=energies[i], forces=forces[i],
                                      source_id=f"{formula}/{rxn}:{i}")


def plans(input_path: str, *, source: str, **_) -> list[SplitPlan]:
    with open_h5(input_path) as f:
        missing = [s for s in splits_lib.SPLITS if s not in f]
    if missing:
        raise InputFormatError(f"{input_path}: Transition-1x file lacks split groups {missing}")
    return [
        SplitPlan(source, split, lambda s=split: _records(input_path, s), ENERGY_FORCE_UNITS, [input_path])
        for split in splits_lib.SPLITS
    ]
