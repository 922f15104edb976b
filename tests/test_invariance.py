"""Physical invariances of energies and forces under the default ("invariant") neighbour policy.

Perfect crystals, slabs and every periodic cell have neighbours at exactly equal distances (whole shells,
an atom's +n / -n images) and exactly collinear atoms; with strict caps, JMP's symmetrisation and float32
dihedrals of collinear atoms, the energy depended on atom order, orientation and cell choice by percents.
Every transformation below must leave energies unchanged and carry forces along with the structure, through
`predict`, the ASE calculator and the training loss. Transformations are drawn from seeded generators: atom
permutation, rigid rotation of positions and cell, translation, wrapping atoms by lattice vectors, and an
equivalent cell (unimodular change of basis).

Tolerances: float64 proves the invariance exact (1e-10). In float32 the floor is rounding: the same crystal
predicted in another batch moves by up to 2e-5 of its energy (sums over ~600 edges per atom), so float32
energies are held to 5e-5 relative and forces to 1e-4 of the batch's largest force.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from ase import Atoms
from ase.build import add_adsorbate, bulk, fcc111, molecule
from test_pretrained import write_random_checkpoint

import jmp_jax
from jmp_jax.ase_calculator import JMPCalculator
from jmp_jax.data.pipeline import label_arrays
from jmp_jax.graph import batching
from jmp_jax.graph.build import GraphSettings, build_from_atoms
from jmp_jax.graph.batching import bucketed_budgets
from jmp_jax.pretrained import build_graphs
from jmp_jax.data.types import TaskNormalization
from jmp_jax.data.types import LabeledBatch
from jmp_jax.training.train_step import shard_loss_and_errors

# (energy, relative; forces, of the largest force component) per compute dtype, see the module docstring.
TOLERANCES = {"float32": (5e-5, 1e-4), "float64": (1e-10, 1e-9)}
SEEDS = (0, 1)
# Unimodular integer matrices: new lattice vectors as integer combinations of the old ones.
UNIMODULAR = (np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]]), np.array([[1, 0, 0], [1, 1, 0], [0, -1, 1]]))


def cu_slab_with_oxygen() -> Atoms:
    slab = fcc111("Cu", (2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.5, "fcc")
    slab.set_tags([0] * 4 + [1] * 8 + [2])  # OC20 tags: sub-surface, surface, adsorbate
    slab.rattle(0.02, seed=0)
    return slab


def structures() -> dict[str, Atoms]:
    """Molecules, perfect crystals of several lattices, slabs with adsorbates and supercells."""
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    perfect_slab = fcc111("Cu", (2, 2, 2), vacuum=6.0)
    add_adsorbate(perfect_slab, "O", 1.5, "fcc")
    perfect_slab.set_tags([1] * 8 + [2])
    return {
        "ethanol": ethanol,
        "cu_fcc": bulk("Cu", "fcc", a=3.61),
        "cu_fcc_cubic": bulk("Cu", "fcc", a=3.61, cubic=True),
        "nacl": bulk("NaCl", "rocksalt", a=5.64),
        "fe_bcc": bulk("Fe", "bcc", a=2.87, cubic=True),
        "mg_hcp": bulk("Mg", "hcp", a=3.21, c=5.21),
        "si_diamond": bulk("Si", "diamond", a=5.43),
        "cu_slab_rattled": cu_slab_with_oxygen(),
        "cu_slab_perfect": perfect_slab,
        "cu_fcc_2x2x2": bulk("Cu", "fcc", a=3.61).repeat(2),
        "nacl_2x2x2": bulk("NaCl", "rocksalt", a=5.64).repeat(2),
    }


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """(3, 3) proper rotation, uniform over SO(3)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q * np.linalg.det(q)


# Each transformation: (atoms, rng) -> (new atoms, map of forces (N, 3) of the old atoms to the new ones).
def permute(atoms: Atoms, rng):
    order = rng.permutation(len(atoms))
    return atoms[order], lambda f: f[order]


def rotate(atoms: Atoms, rng):
    rotation = random_rotation(rng)
    new = atoms.copy()
    new.set_cell(atoms.cell[:] @ rotation.T, scale_atoms=False)
    new.positions = atoms.positions @ rotation.T
    return new, lambda f: f @ rotation.T


def translate(atoms: Atoms, rng):
    new = atoms.copy()
    new.positions = atoms.positions + rng.uniform(-3.0, 3.0, size=3)
    return new, lambda f: f


def wrap_by_lattice_vectors(atoms: Atoms, rng):
    new = atoms.copy()
    new.positions = atoms.positions + rng.integers(-2, 3, size=(len(atoms), 3)) @ atoms.cell[:]
    return new, lambda f: f


def equivalent_cell(atoms: Atoms, rng):
    new = atoms.copy()
    new.set_cell(UNIMODULAR[rng.integers(len(UNIMODULAR))] @ atoms.cell[:], scale_atoms=False)
    new.wrap(pbc=True)
    return new, lambda f: f


TRANSFORMS = {"permute": permute, "rotate": rotate, "translate": translate}
CELL_TRANSFORMS = {"wrap": wrap_by_lattice_vectors, "equivalent_cell": equivalent_cell}


def transformed(name: str, atoms: Atoms, seed: int):
    transform = {**TRANSFORMS, **CELL_TRANSFORMS}[name]
    return transform(atoms, np.random.default_rng([seed, len(atoms)]))


def cases():
    """(transformation, seed, structure names it applies to)."""
    every = list(structures())
    periodic = [name for name, atoms in structures().items() if atoms.pbc.any()]
    return [(t, seed, every if t in TRANSFORMS else periodic) for t in {**TRANSFORMS, **CELL_TRANSFORMS}
            for seed in SEEDS]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("invariance") / "ckpt")


@pytest.fixture(scope="module", params=sorted(TOLERANCES))
def model(checkpoint, request):
    with jax.enable_x64(request.param == "float64"):
        return jmp_jax.load_pretrained(checkpoint, dtype=request.param)


@pytest.fixture(scope="module")
def reference_prediction(model):
    atoms = structures()
    return dict(zip(atoms, _predict(model, list(atoms.values()))))


def _predict(model, atoms_list) -> list[tuple[float, np.ndarray]]:
    with jax.enable_x64(model.dtype == np.float64):
        out = model.predict(atoms_list, head="catalysis", batch_size=len(atoms_list))
    return list(zip(out["energy"], out["forces"]))


def _assert_same(name: str, energy, forces, expected_energy, expected_forces, force_scale: float, dtype):
    """force_scale: the largest force of the batch (a perfect crystal's own forces are zero up to rounding)."""
    energy_rtol, force_tol = TOLERANCES[np.dtype(dtype).name]
    assert abs(energy - expected_energy) <= energy_rtol * abs(expected_energy), name
    np.testing.assert_allclose(forces, expected_forces, rtol=0, atol=force_tol * force_scale, err_msg=name)


def _largest_force(predictions) -> float:
    return max(np.abs(forces).max() for _, forces in predictions)


@pytest.mark.parametrize("transform,seed,names", cases(), ids=lambda v: v if isinstance(v, str) else None)
def test_predict_is_invariant(model, reference_prediction, transform, seed, names):
    """One batch of every structure, transformed: same energies, forces carried along."""
    moved = [transformed(transform, structures()[name], seed) for name in names]
    predicted = _predict(model, [atoms for atoms, _ in moved])
    scale = _largest_force(reference_prediction.values())
    for name, (_, carry), (energy, forces) in zip(names, moved, predicted):
        expected_energy, expected_forces = reference_prediction[name]
        _assert_same(f"{name} {transform} seed {seed}", energy, forces, expected_energy, carry(expected_forces),
                     scale, model.dtype)


@pytest.mark.parametrize("cell,supercell", [("cu_fcc", "cu_fcc_2x2x2"), ("nacl", "nacl_2x2x2")])
def test_bulk_energy_is_extensive(model, reference_prediction, cell, supercell):
    """E of a 2x2x2 supercell = 8 E of its cell; every copy of an atom feels the same force."""
    energy, forces = reference_prediction[cell]
    super_energy, super_forces = reference_prediction[supercell]
    _assert_same(f"{supercell} vs 8 x {cell}", super_energy, super_forces, 8 * energy, np.tile(forces, (8, 1)),
                 _largest_force(reference_prediction.values()), model.dtype)


def test_default_caps_keep_whole_shells_strict_caps_cut_them():
    """fcc neighbour shells hold 12, 6 and 24 atoms: a cap of 30 cuts through the third. The default cap keeps
    it whole (42 edges into every atom); the reference's strict cap keeps 30, i.e. whichever 18 tied edges
    come first, which is what made energies depend on atom order."""
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    default = GraphSettings.pretrain_periodic()
    strict = dataclasses.replace(default, neighbor_policy="reference")
    assert np.bincount(build_from_atoms(atoms, default).main_knn.receivers).tolist() == [42] * 4
    assert np.bincount(build_from_atoms(atoms, strict).main_knn.receivers).tolist() == [30] * 4


@pytest.mark.parametrize("forces", ["gradient", "direct"])
def test_ase_calculator_is_invariant(checkpoint, forces):
    """An MD user's view: the calculator's energy and forces follow the atoms, whatever their order or frame."""
    base = cu_slab_with_oxygen()
    calc = JMPCalculator(checkpoint, head="catalysis", forces=forces)
    base.calc = calc
    energy, base_forces = base.get_potential_energy(), base.get_forces()
    for transform in ("permute", "rotate", "equivalent_cell"):
        moved, carry = transformed(transform, base, seed=7)
        moved.calc = calc
        _assert_same(f"calculator {transform}", moved.get_potential_energy(), moved.get_forces(), energy,
                     carry(base_forces), np.abs(base_forces).max(), np.float32)


def test_training_loss_is_invariant(checkpoint):
    """The pre-training loss of a batch is unchanged when its structures and labels are transformed alike."""
    model = jmp_jax.load_pretrained(checkpoint)
    names = ["ethanol", "cu_fcc_cubic", "cu_slab_rattled", "mg_hcp"]
    rng = np.random.default_rng(5)
    base = [structures()[name] for name in names]
    labels = [{"energy": rng.normal() * 10, "forces": rng.normal(size=(len(a), 3))} for a in base]
    norm = TaskNormalization(energy_std=2.0, force_std=0.5, energy_coefficient=1.0, force_coefficient=10.0)
    loss_fn = jax.jit(lambda batch: shard_loss_and_errors(
        model.variables["params"], model.variables["constants"], batch, model=model.module, task=1, norm=norm,
        training=False)[0])

    def loss(atoms_list, label_list):
        graphs = build_graphs(atoms_list)
        budgets = bucketed_budgets(graphs)
        records = [{"atomic_numbers": a.numbers, **lab} for a, lab in zip(atoms_list, label_list)]
        energy, forces = label_arrays(records, budgets, None)
        return float(loss_fn(LabeledBatch(graphs=batching.collate(graphs, budgets), energy=energy, forces=forces)))

    expected = loss(base, labels)
    for transform in ("permute", "rotate", "translate"):
        moved = [transformed(transform, atoms, seed=11) for atoms in base]
        moved_labels = [{"energy": lab["energy"], "forces": carry(lab["forces"])}
                        for lab, (_, carry) in zip(labels, moved)]
        assert loss([a for a, _ in moved], moved_labels) == pytest.approx(expected, rel=TOLERANCES["float32"][0]), \
            transform
