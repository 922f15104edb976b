"""JMPCalculator: ase interface, conservative gradient forces and a short relaxation (random demo model)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.optimize import BFGS

import jmp_jax
from jmp_jax.ase_calculator import JMPCalculator
from test_pretrained import ethanol, write_random_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("jmp_random_calc") / "ckpt")


def rattled_ethanol(seed: int):
    atoms = ethanol()
    atoms.rattle(0.05, seed=seed)
    return atoms


def test_direct_calculator_matches_predict(checkpoint):
    calc = JMPCalculator(checkpoint, head="catalysis")
    atoms = rattled_ethanol(0)
    atoms.calc = calc
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    expected = calc.model.predict([atoms], head=1)
    assert energy == pytest.approx(expected["energy"][0], rel=1e-6)
    assert atoms.get_potential_energy(force_consistent=True) == energy  # free_energy
    np.testing.assert_allclose(forces, expected["forces"][0], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="forces must be one of"):
        JMPCalculator(calc.model, forces="numerical")
    with pytest.raises(ValueError, match="unknown head 2"):
        JMPCalculator(calc.model, head=2)


def test_gradient_forces_are_minus_energy_derivative(checkpoint):
    """Central differences along random directions in float64 (weights cast too). At h = 1e-4 Å the
    truncation (~h^2) and rounding (~1e-16 |E| / h) errors leave ~1e-9 relative (measured 1.4e-9; 6e-7 at
    h = 1e-2), so rel 1e-7 is tight; in float32 the energy rounding alone would give ~1e-3 relative."""
    with jax.enable_x64(True):
        calc = JMPCalculator(jmp_jax.load_pretrained(checkpoint, dtype=jnp.float64), head="molecules",
                             forces="gradient")
        atoms = rattled_ethanol(1)
        atoms.calc = calc
        forces = atoms.get_forces()
        assert np.abs(forces).max() > 1e-3  # a non-trivial check
        step = 1e-4
        for direction in np.random.default_rng(0).normal(size=(3,) + forces.shape):
            direction /= np.linalg.norm(direction)
            energies = []
            for sign in (1.0, -1.0):
                displaced = atoms.copy()
                displaced.positions += sign * step * direction
                displaced.calc = calc
                energies.append(displaced.get_potential_energy())
            derivative = (energies[0] - energies[1]) / (2 * step)
            assert derivative == pytest.approx(-np.sum(forces * direction), rel=1e-7, abs=1e-9)


def test_bfgs_lowers_energy_and_reuses_compiled_shapes(checkpoint):
    model = jmp_jax.load_pretrained(checkpoint)
    atoms = rattled_ethanol(2)
    atoms.rattle(0.1, seed=3)
    atoms.calc = JMPCalculator(model, head="molecules", forces="gradient")
    start = atoms.get_potential_energy()
    compiles = model.num_compiles
    BFGS(atoms, maxstep=0.05, logfile=None).run(fmax=1e-3, steps=5)
    assert atoms.get_potential_energy() < start
    assert model.num_compiles == compiles  # every step reused the first step's compiled shape
