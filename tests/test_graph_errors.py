"""Bad structures give clear errors that name the structure."""
import numpy as np
import pytest

from jmp_jax.graph.build import GraphSettings, build_structure_graphs
from jmp_jax.graph.validate import GraphInputError

MOLECULE = GraphSettings.pretrain_molecule()
WATER_Z = [8, 1, 1]
WATER_POS = [[0.0, 0.0, 0.0], [0.96, 0.0, 0.0], [-0.24, 0.93, 0.0]]


def _build(z=WATER_Z, pos=WATER_POS, cell=None, pbc=(False, False, False), tags=None,
           settings=MOLECULE, name="bad-water"):
    return build_structure_graphs(z, pos, cell, pbc, tags, settings, name=name)


@pytest.mark.parametrize("kwargs,message", [
    (dict(z=[8, 0, 1]), r"unknown element Z=0 at atom 1"),
    (dict(z=[8, 1, 121]), r"unknown element Z=121 at atom 2"),
    (dict(z=[8.0, 1.5, 1.0]), r"atomic_numbers must be integers"),
    (dict(pos=[[0, 0, 0], [np.nan, 0, 0], [0.5, 0.5, 0]]), r"non-finite position .* atom 1"),
    (dict(pos=[[0, 0, 0], [0.9, np.inf, 0], [0.5, 0.5, 0]]), r"non-finite position .* atom 1"),
    (dict(z=[], pos=np.zeros((0, 3))), r"empty structure"),
    (dict(pos=[[0, 0, 0], [1, 0, 0]]), r"positions must have shape \(3, 3\)"),
    (dict(pos=[[0, 0, 0], [0.96, 0, 0], [0.961, 0, 0]]), r"atoms 1 and 2 overlap"),
    (dict(pbc=(True, True, True), cell=np.diag([5.0, 5.0, 0.0])), r"invalid cell for periodic"),
    (dict(pbc=(True, False, False)), r"invalid cell for periodic"),  # no cell at all
    (dict(pbc=(True, True, True), cell=np.full((3, 3), np.nan)), r"cell contains NaN"),
    (dict(tags=[1, 2]), r"tags must have shape \(3,\)"),
])
def test_bad_input_is_named(kwargs, message):
    with pytest.raises(GraphInputError, match=message) as info:
        _build(**kwargs)
    assert isinstance(info.value, ValueError)
    assert "'bad-water'" in str(info.value) and info.value.structure == "bad-water"


def test_self_image_overlap_in_tiny_cell():
    with pytest.raises(GraphInputError, match="overlaps its own periodic image"):
        build_structure_graphs([1], [[0.0, 0.0, 0.0]], np.diag([0.005, 3.0, 3.0]), (True, True, True),
                               None, GraphSettings(cutoff=2.0, max_neighbors=4), name="tiny")


def test_pbc_must_come_from_somewhere():
    with pytest.raises(ValueError, match="pbc not given"):
        build_structure_graphs(WATER_Z, WATER_POS, None, None, None,
                               GraphSettings(cutoff=5.0, max_neighbors=12), name="no-pbc")
