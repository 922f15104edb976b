"""SPICE HDF5 subsets as JMP fine-tunes on them (dipeptides, solvated amino acids).

Layout: <molecule>/{atomic_numbers (N,), conformations (C, N, 3) bohr, dft_total_energy (C,) Ha,
dft_total_gradient (C, N, 3) Ha/bohr, formation_energy (C,) Ha, smiles, subset}.
Stored: positions Å, energy = total energy eV, forces = -gradient eV/Å (JMP PR #2 sign fix),
target formation_energy eV. Split: all conformers in file order, 80/10/10 with seed 42.
"""
from __future__ import annotations

import h5py

from data_prep import splits as splits_lib
from jmp_jax.data.records import make_record
from data_prep.sources.common import (
    BOHR_ANGSTROM,
    ENERGY_FORCE_UNITS,
    HARTREE_EV,
    SplitPlan,
    dataset_stem,
    h5_dataset,
    open_h5,
)


def _conformers(f, path: str) -> list[tuple[str, int]]:
    out = []
    for name, group in f.items():
        if isinstance(group, h5py.Group) and "conformations" in group:
            out.extend((name, i) for i in range(h5_dataset(group, "conformations", path).shape[0]))
    return out


def _records(path: str, conformers: list[tuple[str, int]]):
    with open_h5(path) as f:
        for name, i in conformers:
            group = f[name]
            yield make_record(
                h5_dataset(group, "atomic_numbers", path)[()],
                h5_dataset(group, "conformations", path)[i] * BOHR_ANGSTROM,
                energy=h5_dataset(group, "dft_total_energy", path)[i] * HARTREE_EV,
                forces=-h5_dataset(group, "dft_total_gradient", path)[i] * (HARTREE_EV / BOHR_ANGSTROM),
                targets={"formation_energy": h5_dataset(group, "formation_energy", path)[i] * HARTREE_EV},
                source_id=f"{name}:{i}",
            )


def plans(input_path: str, *, source: str, **_) -> list[SplitPlan]:
    with open_h5(input_path) as f:
        conformers = _conformers(f, input_path)
    indices = splits_lib.split_by_fractions(len(conformers))
    name = f"{source}_{dataset_stem(input_path, 'spice_', ('.hdf5', '.h5'))}"
    units = dict(ENERGY_FORCE_UNITS, formation_energy="eV")
    return [
        SplitPlan(name, split, lambda idx=indices[split]: _records(input_path, [conformers[i] for i in idx]),
                  units, [input_path])
        for split in splits_lib.SPLITS
    ]
