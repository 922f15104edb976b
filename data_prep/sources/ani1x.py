"""ANI-1x release HDF5 (one group per formula): wB97x/6-31G(d) energies and forces.

Layout: <formula>/{atomic_numbers (N,), coordinates (C, N, 3) Å, wb97x_dz.energy (C,) Ha,
wb97x_dz.forces (C, N, 3) Ha/Å, ...}. As JMP: molecules with < 4 atoms are dropped, then
val and test each take whole molecules until they hold >= 10% of the frames (JMP: 495,600
of ~4.96M), seed 42; frames with NaN labels are skipped (and counted) when written.
"""
from __future__ import annotations

from data_prep import splits as splits_lib
from jmp_jax.data.records import make_record
from data_prep.sources.common import ENERGY_FORCE_UNITS, HARTREE_EV, SplitPlan, h5_dataset, open_h5

ENERGY_KEY = "wb97x_dz.energy"
FORCES_KEY = "wb97x_dz.forces"
MIN_ATOMS = 4
HOLDOUT_FRACTION = 0.1


def _records(path: str, keys: list[str]):
    with open_h5(path) as f:
        for key in keys:
            group = f[key]
            z = h5_dataset(group, "atomic_numbers", path)[()]
            positions = h5_dataset(group, "coordinates", path)[()]
            energies = h5_dataset(group, ENERGY_KEY, path)[()] * HARTREE_EV
            forces = h5_dataset(group, FORCES_KEY, path)[()] * HARTREE_EV
            for i in range(positions.shape[0]):
                yield make_record(z, positions[i], energy=energies[i], forces=forces[i], source_id=f"{key}:{i}")


def plans(input_path: str, *, source: str, holdout_fraction: float = HOLDOUT_FRACTION, **_) -> list[SplitPlan]:
    with open_h5(input_path) as f:
        sizes, dropped = {}, {"molecules": 0, "frames": 0}
        for key in f:
            num_atoms = h5_dataset(f[key], "atomic_numbers", input_path).shape[0]
            num_frames = h5_dataset(f[key], "coordinates", input_path).shape[0]
            if num_atoms < MIN_ATOMS:
                dropped["molecules"] += 1
                dropped["frames"] += num_frames
            else:
                sizes[key] = num_frames
    holdout = int(round(holdout_fraction * sum(sizes.values())))
    keys = splits_lib.group_holdout(sizes, holdout)
    extra = {"dropped_small_molecules": dropped, "min_atoms": MIN_ATOMS, "holdout_frames": holdout}
    return [
        SplitPlan(source, split, lambda k=keys[split]: _records(input_path, k), ENERGY_FORCE_UNITS,
                  [input_path], dict(extra, molecules=len(keys[split])))
        for split in splits_lib.SPLITS
    ]
