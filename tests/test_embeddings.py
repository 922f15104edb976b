"""`experiments.embeddings` end to end on two tiny datasets (molecules, small crystals) with the random demo model."""
from __future__ import annotations

import json

import numpy as np
import pytest
from ase.build import bulk, molecule

from data_prep import shard_writer
from jmp_jax.data import records as records_lib
from experiments import embeddings
from jmp_jax.models.config import demo
from test_pretrained import write_random_checkpoint

MOLECULES = ["CH3CH2OH", "H2O", "CH4", "NH3", "C2H6"]  # 9 + 3 + 5 + 4 + 8 atoms
CRYSTALS = [("Cu", "fcc", 3.6), ("Al", "fcc", 4.05), ("Si", "diamond", 5.43), ("Ni", "fcc", 3.52)]
PER_DATASET, MAX_ATOMS = 3, 16


def molecule_records():
    return [records_lib.make_record(m.numbers, m.positions, source_id=f"mol:{i}")
            for i, m in enumerate(molecule(name) for name in MOLECULES)]


def crystal_records():
    return [records_lib.make_record(c.numbers, c.positions, source_id=f"bulk:{i}", cell=c.cell.array, pbc=c.pbc)
            for i, c in enumerate(bulk(symbol, kind, a=a, cubic=True) for symbol, kind, a in CRYSTALS)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("embeddings")
    checkpoint = write_random_checkpoint(root / "ckpt")
    for source, records in (("mols", molecule_records()), ("crystals", crystal_records())):
        shard_writer.write_split(records, str(root / "data"), source, "val", units={}, source_files=[])
    return root, checkpoint


def run_cli(root, checkpoint, output, seed=0):
    data = str(root / "data")
    return embeddings.main(["--checkpoint", checkpoint, "--data", f"{data}:mols:val", "--data",
                            f"{data}:crystals:val", "--per-dataset", str(PER_DATASET), "--max-atoms",
                            str(MAX_ATOMS), "--seed", str(seed), "--output", str(output)])


@pytest.fixture(scope="module")
def cli_run(setup):
    root, checkpoint = setup
    return root / "out", run_cli(root, checkpoint, root / "out")


def test_cli_writes_panels_per_layer(cli_run):
    from matplotlib import image

    output, summary = cli_run
    layers = ["h_embedding", "h_block0", "h_block1", "energy_features"]
    assert list(summary["layers"]) == layers
    # Each dataset gives at most MAX_ATOMS // 2 atoms; the 3 crystals sampled hold at least 8 + 4 + 4 atoms,
    # the 3 molecules at least 3 + 4 + 5.
    assert summary["num_atoms_plotted"] == MAX_ATOMS
    assert all(shape == [MAX_ATOMS, demo().emb_size_atom] for shape in summary["layers"].values())
    with open(output / "embeddings.json") as f:
        assert json.load(f) == summary
    saved = np.load(output / "tsne.npz")
    assert all(saved[f"coords_{layer}"].shape == (MAX_ATOMS, 2) for layer in layers)
    assert np.all(np.bincount(saved["dataset_ids"]) == MAX_ATOMS // 2)
    crystal_elements = {13, 14, 28, 29}
    assert set(saved["atomic_numbers"][saved["dataset_ids"] == 1].tolist()) <= crystal_elements
    assert set(saved["atomic_numbers"][saved["dataset_ids"] == 0].tolist()) <= {1, 6, 7, 8}
    for name in summary["figures"]:
        pixels = image.imread(output / name)
        # 4 panels in one row, plus the legend column: wider than tall.
        assert pixels.ndim == 3 and pixels.shape[1] > 3 * pixels.shape[0] > 600
        assert pixels[..., :3].std() > 0.05


def test_cli_is_deterministic_given_seed(setup, cli_run):
    root, checkpoint = setup
    output, _ = cli_run
    run_cli(root, checkpoint, root / "again")
    again = np.load(root / "again" / "tsne.npz")
    first = np.load(output / "tsne.npz")
    assert sorted(again.files) == sorted(first.files)
    for key in first.files:
        np.testing.assert_array_equal(again[key], first[key])


def test_tsne_inputs_pick_atoms_evenly_and_keep_rows_aligned():
    rng = np.random.default_rng(0)
    # 3 structures: 5 and 3 atoms of dataset 0, 20 atoms of dataset 1; feature = global atom index.
    sizes, ids = [5, 3, 20], [0, 0, 1]
    offsets = np.cumsum([0] + sizes)
    per_structure = [{"a": np.arange(o, o + n, dtype=float)[:, None].repeat(4, 1), "b": np.full((n, 2), float(i))}
                     for i, (o, n) in enumerate(zip(offsets, sizes))]
    dataset_ids = np.concatenate([np.full(n, d) for n, d in zip(sizes, ids)])
    z = np.arange(28) % 7 + 1
    layers, kept_ids, kept_z = embeddings.tsne_inputs(per_structure, dataset_ids, z, 12, rng)
    assert layers["a"].shape == (12, 4) and layers["b"].shape == (12, 2)
    assert np.bincount(kept_ids).tolist() == [6, 6]  # quota 12 // 2 from each dataset
    rows = layers["a"][:, 0].astype(int)  # which atoms were kept, in order
    assert np.all(np.diff(rows) > 0)
    np.testing.assert_array_equal(kept_ids, dataset_ids[rows])
    np.testing.assert_array_equal(kept_z, z[rows])
    # A dataset with fewer atoms than its quota gives all of them.
    _, kept_ids, _ = embeddings.tsne_inputs(per_structure, dataset_ids, z, 40, rng)
    assert np.bincount(kept_ids).tolist() == [8, 20]


def test_element_labels_and_bad_specs():
    labels, names = embeddings.element_labels(np.array([8, 1, 1, 6, 1, 8]))
    assert names == ["H", "O", "C"] and labels.tolist() == [1, 0, 0, 2, 0, 1]
    many = np.arange(1, 31).repeat(2)
    labels, names = embeddings.element_labels(many)
    assert len(names) == embeddings.MAX_ELEMENT_COLOURS and names[-1] == "other" and labels.max() == 19
    assert embeddings.parse_dataset_spec("C:/data:x:oc20:val") == ("C:/data:x", "oc20", "val")
    with pytest.raises(embeddings.DatasetSpecError, match="expected DIR:SOURCE:SPLIT"):
        embeddings.parse_dataset_spec("data/oc20")


def test_too_few_records(setup):
    root, _ = setup
    with pytest.raises(embeddings.DatasetSpecError, match="crystals-val .* has 4 records; --per-dataset asks for 9"):
        embeddings.sample_records(str(root / "data"), "crystals", "val", 9, np.random.default_rng(0))
