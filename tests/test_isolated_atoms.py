"""An atom with no neighbour within the cutoff (a dissociated fragment, a lone adsorbate) is accepted, as in
JMP: it has no edges, keeps its embedding through the blocks, feels no force and adds an energy that depends
only on its element."""
from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from test_pretrained import write_random_checkpoint

import jmp_jax
from jmp_jax.pretrained import build_graphs


def water_and_far_argon(argon_position) -> Atoms:
    water = molecule("H2O")
    return water + Atoms("Ar", positions=[argon_position])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return jmp_jax.load_pretrained(write_random_checkpoint(tmp_path_factory.mktemp("isolated") / "ckpt"))


def test_isolated_atom_has_no_edges():
    (graphs,) = build_graphs([water_and_far_argon([20.0, 0.0, 0.0])])
    for edges in (graphs.a2a, graphs.main, graphs.a2ee2a, graphs.qint):
        assert 3 not in edges.receivers and 3 not in edges.senders
    assert graphs.main.num_edges == 6  # water's three atoms all see each other


@pytest.mark.parametrize("forces", ["direct", "gradient"])
def test_isolated_atom_adds_its_own_energy_and_feels_no_force(model, forces):
    structures = [water_and_far_argon([20.0, 0.0, 0.0]), water_and_far_argon([0.0, -15.0, 9.0]),
                  molecule("H2O"), Atoms("Ar", positions=[[1.0, 2.0, 3.0]])]
    out = model.predict(structures, head="molecules", forces=forces, batch_size=len(structures))
    energy = out["energy"]
    assert np.all(np.isfinite(energy)) and all(np.all(np.isfinite(f)) for f in out["forces"])
    assert energy[0] == pytest.approx(energy[1], rel=1e-6)  # wherever the lone atom is
    assert energy[0] == pytest.approx(energy[2] + energy[3], rel=1e-5)  # water + argon alone
    np.testing.assert_array_equal(out["forces"][0][3], 0.0)
    np.testing.assert_array_equal(out["forces"][3], 0.0)
    np.testing.assert_allclose(out["forces"][0][:3], out["forces"][2], rtol=0,
                               atol=1e-5 * np.abs(out["forces"][2]).max())
