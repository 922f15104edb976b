"""OC20-like adslabs: small fcc slabs with one adsorbate, frames of a short EMT relaxation, EMT labels."""
from __future__ import annotations

import sys
from typing import Iterator

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.optimize import LBFGS

from data_prep.synthetic import structure_record


METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")

SITES = {"fcc111": ("ontop", "bridge", "fcc", "hcp"), "fcc100": ("ontop", "bridge", "hollow")}

VACUUM = 7.0

RELAX_STEPS = 40

# Adsorbates EMT can label (H, C, N, O), binding atom first at the origin, pointing up (+z), in Å.
ADSORBATES = {
    "H": ("H", [[0, 0, 0]]), "O": ("O", [[0, 0, 0]]), "C": ("C", [[0, 0, 0]]), "N": ("N", [[0, 0, 0]]),
    "OH": ("OH", [[0, 0, 0], [0, 0, 0.97]]), "CO": ("CO", [[0, 0, 0], [0, 0, 1.15]]),
    "NO": ("NO", [[0, 0, 0], [0, 0, 1.16]]), "CH": ("CH", [[0, 0, 0], [0, 0, 1.09]]),
    "NH": ("NH", [[0, 0, 0], [0, 0, 1.02]]), "CH2": ("CH2", [[0, 0, 0], [0.9, 0, 0.6], [-0.9, 0, 0.6]]),
    "NH2": ("NH2", [[0, 0, 0], [0.82, 0, 0.58], [-0.82, 0, 0.58]]),
    "H2O": ("OH2", [[0, 0, 0], [0.76, 0, 0.59], [-0.76, 0, 0.59]]),
    "CH3": ("CH3", [[0, 0, 0], [1.03, 0, 0.36], [-0.51, 0.89, 0.36], [-0.51, -0.89, 0.36]]),
}


def _adsorbate(name: str, rng: np.random.Generator) -> Atoms:
    """The adsorbate, randomly spun about z and tilted by up to ~25 degrees about x."""
    symbols, positions = ADSORBATES[name]
    ads = Atoms(symbols, positions=positions)
    ads.rotate(rng.uniform(0.0, 25.0), "x", center=(0, 0, 0))
    ads.rotate(rng.uniform(0.0, 360.0), "z", center=(0, 0, 0))
    return ads


def _random_adslab(rng: np.random.Generator) -> tuple[Atoms, str]:
    """A small fcc slab (ase lattice constant) with one adsorbate near a random site; ase tags 0 = adsorbate,
    1.. = layer."""
    metal, facet = rng.choice(METALS), rng.choice(tuple(SITES))
    width, layers = int(rng.choice([2, 3])), int(rng.choice([3, 4]))
    slab = (fcc111 if facet == "fcc111" else fcc100)(metal, size=(width, width, layers), vacuum=VACUUM)
    name, site = rng.choice(tuple(ADSORBATES)), rng.choice(SITES[facet])
    height = rng.uniform(1.0, 1.6) if name == "H" else rng.uniform(1.2, 2.1)
    offset = rng.integers(0, width, size=2) + rng.uniform(-0.15, 0.15, size=2)
    add_adsorbate(slab, _adsorbate(name, rng), height, position=site, offset=tuple(offset))
    return slab, f"{metal}-{facet}-{width}x{width}x{layers}+{name}@{site}"


def _relaxation_frames(slab: Atoms, fixed: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions (N,3) along a short EMT LBFGS relaxation of the slab with its free atoms rattled by 0.05 Å first."""
    atoms = slab.copy()
    atoms.set_constraint(FixAtoms(mask=fixed))
    atoms.positions[~fixed] += rng.normal(scale=0.05, size=(int((~fixed).sum()), 3))
    atoms.calc = EMT()
    return [atoms.positions.copy() for _ in LBFGS(atoms, logfile=None).irun(fmax=0.05, steps=RELAX_STEPS)]


def catalysis_groups(seed: int, group_size: int) -> Iterator[list[dict]]:
    """Endless adslab groups, OC20 S2EF-like: group_size frames of one EMT relaxation, free atoms rattled again."""
    for system in range(sys.maxsize):
        rng = np.random.default_rng([seed, 0, system])
        slab, label = _random_adslab(rng)
        layer = slab.get_tags()
        tags = np.where(layer == 0, 2, np.where(layer <= 2, 1, 0))  # OC20: adsorbate 2, top two layers 1
        fixed = tags == 0
        trajectory = _relaxation_frames(slab, fixed, rng)
        picks = np.sort(rng.choice(len(trajectory), size=group_size, replace=len(trajectory) < group_size))
        group = []
        for frame in picks:
            atoms = slab.copy()
            atoms.positions = trajectory[frame]
            atoms.positions[~fixed] += rng.normal(scale=rng.uniform(0.0, 0.08), size=(int((~fixed).sum()), 3))
            atoms.set_constraint(FixAtoms(mask=fixed))
            atoms.calc = EMT()
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces(apply_constraint=False)
            source_id = f"catalysis/{system:05d}/{label}/step{frame}"
            group.append(structure_record(atoms, tags, fixed, energy, forces, source_id))
        yield group
