"""Tests of the embedded default dataset (data_prep/default_dataset.py): conventions, labels, determinism, cache."""
import importlib.util
import os

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT

pytest.importorskip("tblite")
if importlib.util.find_spec("qm9pack") is None:
    pytest.skip("qm9pack not installed", allow_module_level=True)

from data_prep import default_dataset as dd  # noqa: E402
from data_prep.synthetic import molecules, reactions  # noqa: E402

TINY = 6
FD_STEP = 1e-3  # Å; central differences, truncation error ~ F''' h^2 / 6, far below the tolerances
# EMT is analytic and closed-form: measured FD error ~2e-5 eV/Å at this step.
EMT_FD_TOL = 1e-3
# xTB energies carry SCF convergence noise (~1e-7 eV) amplified by 1/(2h): measured FD error ~6e-5 eV/Å.
XTB_FD_TOL = 2e-3


@pytest.fixture(scope="module")
def tiny():
    """{domain: {"train": [...], "val": [...]}} of a 6-structure-per-domain build, seed 0."""
    return {domain: dd.generate_domain(domain, TINY, seed=0) for domain in dd.DOMAINS}


def _all(splits):
    return splits["train"] + splits["val"]


def _central_difference(energy_fn, positions, atom, axis):
    """-dE/dx of one coordinate by central differences with step FD_STEP."""
    plus, minus = positions.copy(), positions.copy()
    plus[atom, axis] += FD_STEP
    minus[atom, axis] -= FD_STEP
    return -(energy_fn(plus) - energy_fn(minus)) / (2 * FD_STEP)


def test_counts_and_splits_are_group_disjoint(tiny):
    for domain, splits in tiny.items():
        assert len(splits["train"]) + len(splits["val"]) == TINY, domain
        assert splits["train"] and splits["val"], domain
        # source_id = domain/system/...: a system (slab, molecule, path) never straddles train and val
        systems = {split: {r["source_id"].split("/")[1] for r in recs} for split, recs in splits.items()}
        assert not systems["train"] & systems["val"], domain


def test_catalysis_tags_fixed_and_pbc(tiny):
    for r in _all(tiny["catalysis"]):
        tags, fixed, z = r["tags"], r["fixed"], r["atomic_numbers"]
        assert set(np.unique(tags)) <= {0, 1, 2} and (tags == 0).any() and (tags == 1).any()
        np.testing.assert_array_equal(fixed, tags == 0)
        assert np.all(np.isin(z[tags == 2], [1, 6, 7, 8])) and (tags == 2).any()
        assert not np.isin(z[tags < 2], [1, 6, 7, 8]).any()  # slab atoms are metals
        # surface (tag 1) atoms lie above the fixed sub-surface ones; adsorbate on top of the slab
        assert r["positions"][tags == 1, 2].min() > r["positions"][tags == 0, 2].max()
        assert r["positions"][tags == 2, 2].max() > r["positions"][tags == 1, 2].max()
        np.testing.assert_array_equal(r["pbc"], [True, True, False])
        assert abs(np.linalg.det(r["cell"])) > 0


def test_molecular_conventions(tiny):
    for domain in ("molecules", "reactions"):
        for r in _all(tiny[domain]):
            assert np.all(r["tags"] == 2) and not r["fixed"].any() and not r["pbc"].any(), r["source_id"]
            np.testing.assert_array_equal(r["cell"], np.zeros((3, 3)))
            assert r["atomic_numbers"].min() >= 1 and r["atomic_numbers"].max() <= 9  # QM9: H C N O F


def test_labels_finite(tiny):
    for domain, splits in tiny.items():
        for r in _all(splits):
            n = len(r["atomic_numbers"])
            assert r["positions"].shape == r["forces"].shape == (n, 3), r["source_id"]
            assert np.isfinite(r["energy"]) and np.all(np.isfinite(r["forces"])), r["source_id"]
            assert r["source_id"].startswith(domain + "/")


def test_emt_forces_match_finite_differences(tiny):
    r = tiny["catalysis"]["train"][0]

    def energy(positions):
        atoms = Atoms(r["atomic_numbers"], positions=positions, cell=r["cell"], pbc=r["pbc"])
        atoms.calc = EMT()
        return atoms.get_potential_energy()

    # an adsorbate, a surface and a fixed atom: fixed atoms keep their raw (unconstrained) forces
    atoms_to_check = [np.flatnonzero(r["tags"] == tag)[0] for tag in (2, 1, 0)]
    for atom in atoms_to_check:
        for axis in range(3):
            fd = _central_difference(energy, r["positions"], atom, axis)
            assert abs(fd - r["forces"][atom, axis]) < EMT_FD_TOL, (atom, axis, fd, r["forces"][atom, axis])


@pytest.mark.parametrize("domain", ["molecules", "reactions"])
def test_xtb_forces_match_finite_differences(tiny, domain):
    r = tiny[domain]["train"][-1]
    energy = lambda positions: molecules.xtb_label(r["atomic_numbers"], positions)[0]  # noqa: E731
    for atom in (0, len(r["atomic_numbers"]) - 1):
        for axis in range(3):
            fd = _central_difference(energy, r["positions"], atom, axis)
            assert abs(fd - r["forces"][atom, axis]) < XTB_FD_TOL, (atom, axis, fd, r["forces"][atom, axis])


def test_deterministic_given_seed(tiny):
    for domain in dd.DOMAINS:
        again = dd.generate_domain(domain, TINY, seed=0)
        for a, b in zip(_all(tiny[domain]), _all(again), strict=True):
            assert a["source_id"] == b["source_id"]
            np.testing.assert_array_equal(a["positions"], b["positions"])
            np.testing.assert_allclose(a["energy"], b["energy"], rtol=1e-12)
            np.testing.assert_allclose(a["forces"], b["forces"], rtol=0, atol=1e-9)
        other = dd.generate_domain(domain, TINY, seed=1)
        assert not any(np.array_equal(a["positions"], b["positions"]) for a, b in zip(_all(other), _all(again)))


def test_reaction_path_kinds():
    """Each path kind does what it claims, on ethanol (it admits all three)."""
    ethanol = molecule("CH3CH2OH")
    numbers, positions = ethanol.numbers, ethanol.positions
    seen = set()
    for seed in range(40):
        path = reactions._reaction_path(numbers, positions, 5, np.random.default_rng(seed))
        if path is None:  # a clashing draw
            continue
        kind, frames = path
        assert not reactions._clashes(numbers, frames)
        assert frames.shape == (5, len(numbers), 3)
        np.testing.assert_allclose(frames[0], positions, atol=1e-9)  # every path starts at the molecule
        dist = np.linalg.norm(frames[:, :, None] - frames[:, None], axis=-1)  # (F,N,N)
        bonded = reactions._adjacency(numbers, positions)
        if kind == "stretch":  # exactly one bond grows monotonically to 2-3x, the rest of each fragment is rigid
            grown = np.argwhere(np.triu(bonded) & (dist[-1] > 1.9 * dist[0]))
            assert len(grown) == 1
            i, j = grown[0]
            assert np.all(np.diff(dist[:, i, j]) > 0)
        elif kind == "torsion":  # a rigid rotation of one side: every bond length is kept
            np.testing.assert_allclose(dist[:, bonded], np.broadcast_to(dist[0, bonded], dist[:, bonded].shape),
                                       atol=1e-9)
        else:  # the moved H ends 1.05 Å from a heavy atom it was not bonded to
            moved = np.argmax(np.linalg.norm(frames[-1] - frames[0], axis=-1))
            assert numbers[moved] == 1
            acceptors = (numbers > 1) & ~bonded[moved]
            assert np.isclose(dist[-1, moved, acceptors], 1.05, atol=1e-6).any()
        seen.add(kind)
    assert seen == {"stretch", "torsion", "htransfer"}
    squashed = positions.copy()
    squashed[1] = squashed[0] + [0.3, 0.0, 0.0]
    assert reactions._clashes(numbers, np.stack([positions, squashed]))


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown domain"):
        dd.generate_domain("oc20", 4)
    with pytest.raises(ValueError, match="at least 2"):
        dd.generate_domain("catalysis", 1)
    with pytest.raises(ValueError, match="unknown domains"):
        dd.cache_key({"catalysis": 4, "oc22": 3})


def test_cache_reused_rebuilt_and_never_half_written(tmp_path, monkeypatch):
    records = pytest.importorskip("jmp_jax.data.records")
    sizes = {"catalysis": 4}
    monkeypatch.setenv("JMP_JAX_DATA", str(tmp_path))
    path = dd.ensure_default_dataset(sizes=sizes, progress=False)
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path) == dd.cache_key(sizes)
    stored = [*records.iterate_records(path, "catalysis", "train"), *records.iterate_records(path, "catalysis", "val")]
    fresh = _all(dd.generate_domain("catalysis", 4, seed=0))
    assert [r["source_id"] for r in stored] == [r["source_id"] for r in fresh]
    np.testing.assert_allclose(stored[0]["positions"], fresh[0]["positions"], atol=1e-5)  # stored as float32
    assert stored[0]["energy"] == fresh[0]["energy"]  # stored as float64

    def no_build(*args, **kwargs):
        raise AssertionError("the cached build should have been reused")

    real_build = dd.build_default_dataset
    monkeypatch.setattr(dd, "build_default_dataset", no_build)
    assert dd.ensure_default_dataset(str(tmp_path), sizes=sizes) == path

    # a changed key (sizes, seed, recipe version) rebuilds into its own folder
    monkeypatch.setattr(dd, "build_default_dataset", real_build)
    monkeypatch.setattr(dd, "VERSION", dd.VERSION + "-test")
    new_path = dd.ensure_default_dataset(str(tmp_path), sizes=sizes, progress=False)
    assert new_path != path and os.path.exists(os.path.join(new_path, "manifest.json"))

    # an interrupted build leaves neither a cache entry nor a partial folder
    def interrupted(domain, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dd, "generate_domain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dd.ensure_default_dataset(str(tmp_path), sizes={"catalysis": 5}, progress=False)
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(path), os.path.basename(new_path)])
