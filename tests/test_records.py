"""Record schema, TFRecord IO and split metadata (jmp_jax.data.records / metadata, data_prep.shard_writer /
splits), and the pre-training task set-up's check of the splits' energy kinds."""
import json
import os

import numpy as np
import pytest

from configs import pretrain_common
from data_prep import shard_writer, splits
from jmp_jax.data import metadata, records
from jmp_jax.data import task_data


def _molecule(i, energy=-100.0, n=3, **overrides):
    rng = np.random.default_rng(i)
    kwargs = dict(energy=energy, forces=rng.normal(size=(n, 3)), source_id=f"mol{i}")
    kwargs.update(overrides)
    return records.make_record(np.array([8, 1, 1, 6, 7][:n]), rng.normal(size=(n, 3)), **kwargs)


def _write(tmp_path, recs, name="toy", split="train", **kw):
    kw.setdefault("records_per_shard", 2)
    return shard_writer.write_split(recs, str(tmp_path), name, split, units={"energy": "eV"}, source_files=[], **kw)


def test_float64_energy_and_targets_round_trip_exactly(tmp_path):
    energies = [-97079.92222179123, -1.0000000000000002, 12345.678901234567]
    recs = [_molecule(i, e, targets={"U_0": e / 3, "gap": np.pi * i}) for i, e in enumerate(energies)]
    meta = _write(tmp_path, recs)
    assert meta["num_records"] == 3 and meta["num_shards"] == 2
    back = list(records.iterate_records(str(tmp_path), "toy", "train"))
    for rec, got in zip(recs, back):
        assert got["energy"] == rec["energy"]
        assert got["targets"] == rec["targets"]
        np.testing.assert_array_equal(got["atomic_numbers"], rec["atomic_numbers"])
        np.testing.assert_allclose(got["positions"], rec["positions"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(got["forces"], rec["forces"], rtol=1e-6, atol=1e-6)
        assert got["source_id"] == rec["source_id"] and got["pbc"].dtype == bool
    parsed = list(records.read_split(str(tmp_path), "toy", "train").as_numpy_iterator())
    assert [p["energy"] for p in parsed] == energies
    assert [p["U_0"] for p in parsed] == [e / 3 for e in energies]
    assert parsed[0]["positions"].shape == (3, 3) and parsed[0]["cell"].shape == (3, 3)


def test_records_are_tensorflows_example_bytes_both_ways():
    """jmp_jax.data.example_proto stands in for tf.train.Example: the same bytes out, TensorFlow's bytes in."""
    import tensorflow as tf
    record = _molecule(0, targets={"U_0": -3.5})
    record["cell"] = np.eye(3) * 7.0
    ours = records.encode_example(record)
    feature = tf.train.Example.FromString(ours).features.feature
    assert feature["natoms"].int64_list.value == [3] and list(feature["pbc"].int64_list.value) == [0, 0, 0]
    theirs = tf.train.Example(features=tf.train.Features(feature=dict(feature))).SerializeToString(deterministic=True)
    assert ours == theirs
    back = records.decode_example(theirs)
    assert back["targets"] == {"U_0": -3.5} and back["source_id"] == "mol0" and back["energy"] == record["energy"]
    np.testing.assert_array_equal(back["cell"], record["cell"])


def test_nan_and_empty_records_are_skipped_and_counted(tmp_path):
    bad_pos = _molecule(1)
    bad_pos["positions"][0, 1] = np.nan
    bad_force = _molecule(2)
    bad_force["forces"][2, 0] = np.nan
    recs = [
        _molecule(0),
        bad_pos,
        _molecule(3, energy=np.nan),
        bad_force,
        records.make_record(np.zeros(0), np.zeros((0, 3)), energy=1.0, forces=np.zeros((0, 3)), source_id="empty"),
        _molecule(4),
    ]
    meta = _write(tmp_path, recs)
    assert meta["num_records"] == 2
    assert meta["skipped"] == {"no_atoms": 1, "nan_positions": 1, "far_positions": 0, "nan_labels": 2}
    on_disk = json.load(open(records.metadata_path(str(tmp_path), "toy", "train")))
    assert on_disk["skipped"] == meta["skipped"]
    assert [r["source_id"] for r in records.iterate_records(str(tmp_path), "toy", "train")] == ["mol0", "mol4"]


def test_linear_reference_fit_recovers_known_coefficients(tmp_path):
    rng = np.random.default_rng(0)
    coef = {1: -13.6, 6: -1029.4, 7: -1484.9, 8: -2041.8}
    noise_std = 0.05
    recs = []
    for i in range(400):
        z = rng.choice(list(coef), size=rng.integers(4, 12))
        energy = sum(coef[a] for a in z) + rng.normal(scale=noise_std)
        recs.append(records.make_record(z, rng.normal(size=(len(z), 3)), energy=energy, source_id=str(i)))
    meta = _write(tmp_path, recs, records_per_shard=1000)
    fitted = np.asarray(meta["linear_reference"])
    assert fitted.shape == (metadata.NUM_ELEMENTS,)
    assert set(np.flatnonzero(fitted)) == set(coef)
    for z, c in coef.items():
        assert fitted[z] == pytest.approx(c, abs=0.02)
    referenced = meta["referenced"]
    assert abs(referenced["energy_mean"]) < 0.01
    assert referenced["energy_std"] == pytest.approx(noise_std, rel=0.15)
    assert meta["raw"]["energy_std"] > 100 * noise_std
    # the streaming moments agree with a direct residual computation
    counts = np.stack([metadata.element_counts(r["atomic_numbers"]) for r in recs])
    residual = np.array([r["energy"] for r in recs]) - counts @ fitted
    assert referenced["energy_std"] == pytest.approx(residual.std(), rel=1e-3)
    assert referenced["energy_mean"] == pytest.approx(residual.mean(), abs=1e-6)


def test_force_and_target_spreads(tmp_path):
    recs = [_molecule(i, targets={"gap": float(i)}) for i in range(6)]
    meta = _write(tmp_path, recs)
    forces = np.concatenate([r["forces"].ravel() for r in recs])
    assert meta["raw"]["forces_std"] == pytest.approx(forces.std(), rel=1e-9)
    assert meta["referenced"]["forces_mean"] == pytest.approx(forces.mean(), abs=1e-12)
    assert meta["targets"]["gap"]["mean"] == pytest.approx(2.5)
    assert meta["targets"]["gap"]["std"] == pytest.approx(np.std(np.arange(6.0)))
    unlabeled = _write(tmp_path, [records.make_record([1], np.zeros((1, 3)), source_id="h")], split="x")
    assert unlabeled["linear_reference"] is None and unlabeled["raw"]["energy_std"] is None


def test_metadata_records_the_energy_kind(tmp_path):
    assert _write(tmp_path, [_molecule(0)])["energy_kind"] == "total"
    meta = _write(tmp_path, [_molecule(0)], split="val", energy_kind="referenced")
    assert records.load_metadata(str(tmp_path), "toy", "val")["energy_kind"] == "referenced"
    assert metadata.split_energy_kind(meta) == "referenced"
    unlabeled = _write(tmp_path, [records.make_record([1], np.zeros((1, 3)), source_id="h")], split="x")
    assert unlabeled["energy_kind"] is None and metadata.split_energy_kind(unlabeled) is None
    with pytest.raises(ValueError, match="energy_kind 'adsorption'"):
        _write(tmp_path, [_molecule(0)], split="y", energy_kind="adsorption")
    older = {k: v for k, v in meta.items() if k != "energy_kind"}
    assert metadata.split_energy_kind(older) == "total"  # written before the field: totals


def test_one_task_never_mixes_total_and_referenced_energies():
    total, referenced = {"has_energy": True, "energy_kind": "total"}, {"has_energy": True, "energy_kind": "referenced"}
    no_energy = {"has_energy": False, "energy_kind": None}
    assert metadata.check_energy_kinds("oc20", {"oc20-train": referenced, "oc20-val": referenced}) == "referenced"
    assert metadata.check_energy_kinds("oc20", {"oc20-train": total, "oc20-test": no_energy}, "total") == "total"
    with pytest.raises(ValueError, match=r"^task oc20: splits oc20-train \(referenced\), oc20-val \(total\) hold "
                       r"different energies"):
        metadata.check_energy_kinds("oc20", {"oc20-train": referenced, "oc20-val": total})
    with pytest.raises(ValueError, match=r"^task oc20 expects referenced energies .* splits oc20-train, oc20-val "
                       r"hold total energies"):
        metadata.check_energy_kinds("oc20", {"oc20-train": total, "oc20-val": total}, "referenced")


def test_task_setup_refuses_splits_of_another_energy_kind(tmp_path):
    """Pre-training set-up stops, naming the splits, when a task's train and val hold different energies
    or not the energy its normalisation is for (JMP's oc20 energy_std is for referenced energies)."""
    config = pretrain_common.pretrain_config("demo")
    pretrain_common.use_jmp_data(config, str(tmp_path))
    oc20 = config.data.tasks[0]
    assert (oc20["name"], oc20["energy_kind"]) == ("oc20", "referenced")
    _write(tmp_path, [_molecule(0)], name="oc20", split="train", energy_kind="referenced")
    _write(tmp_path, [_molecule(1)], name="oc20", split="val", energy_kind="referenced")
    task_data.check_energy_kind(config, str(tmp_path), oc20)
    _write(tmp_path, [_molecule(1)], name="oc20", split="val", energy_kind="total")
    with pytest.raises(ValueError, match=r"task oc20: splits oc20-train \(referenced\), oc20-val \(total\)"):
        task_data.load_tasks(config)
    _write(tmp_path, [_molecule(0)], name="oc20", split="train", energy_kind="total")
    with pytest.raises(ValueError, match="task oc20 expects referenced energies"):
        task_data.load_tasks(config)
    task_data.check_energy_kind(config, str(tmp_path), dict(oc20, energy_kind=None))  # no expectation


def test_natoms_histogram_and_percentiles(tmp_path):
    recs = [_molecule(i, n=n) for i, n in enumerate([1, 2, 2, 3, 3, 3, 5])]
    meta = _write(tmp_path, recs)
    assert meta["natoms_histogram"] == {"1": 1, "2": 2, "3": 3, "5": 1}
    p = meta["natoms_percentiles"]
    assert (p["min"], p["p50"], p["max"]) == (1, 3, 5)
    assert p["mean"] == pytest.approx(19 / 7)


def test_rebuild_is_idempotent_and_removes_stale_shards(tmp_path):
    recs = [_molecule(i) for i in range(5)]

    def snapshot():
        return {n: open(os.path.join(tmp_path, n), "rb").read() for n in sorted(os.listdir(tmp_path))}

    _write(tmp_path, recs)
    first = snapshot()
    _write(tmp_path, recs)
    assert snapshot() == first
    assert len(records.shard_paths(str(tmp_path), "toy", "train")) == 3
    _write(tmp_path, recs, records_per_shard=10)
    assert [os.path.basename(p) for p in records.shard_paths(str(tmp_path), "toy", "train")] == [
        "toy-train.tfrecord-00000-of-00001"
    ]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]


def test_corrupt_shard_error_names_the_file(tmp_path):
    _write(tmp_path, [_molecule(i) for i in range(4)])
    shard = records.shard_paths(str(tmp_path), "toy", "train")[1]
    data = bytearray(open(shard, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(records.CorruptShardError, match=os.path.basename(shard)):
        list(records.iterate_records(str(tmp_path), "toy", "train"))
    with pytest.raises(Exception, match=os.path.basename(shard)):
        list(records.read_split(str(tmp_path), "toy", "train").as_numpy_iterator())


def test_missing_shard_and_missing_split_are_reported(tmp_path):
    _write(tmp_path, [_molecule(i) for i in range(4)])
    os.remove(records.shard_paths(str(tmp_path), "toy", "train")[0])
    with pytest.raises(records.CorruptShardError, match="toy-train"):
        list(records.iterate_records(str(tmp_path), "toy", "train"))
    with pytest.raises(FileNotFoundError, match="toy-val"):
        records.load_metadata(str(tmp_path), "toy", "val")


def test_bad_records_raise_naming_the_structure(tmp_path):
    with pytest.raises(records.RecordError, match="broken"):
        records.make_record([1, 1], np.zeros((3, 3)), source_id="broken")
    with pytest.raises(records.RecordError, match="ghost"):
        records.make_record([0, 1], np.zeros((2, 3)), source_id="ghost")
    with pytest.raises(metadata.InconsistentSplitError, match="mol1"):
        _write(tmp_path, [_molecule(0), _molecule(1, energy=None)])
    assert not os.path.exists(records.metadata_path(str(tmp_path), "toy", "train"))


def test_describe_for_tfds_makes_a_readable_builder(tmp_path):
    import tensorflow_datasets as tfds

    _write(tmp_path, [_molecule(i) for i in range(3)], name="toy", split="train")
    shard_writer.describe_for_tfds(str(tmp_path), "toy", "train")
    builder = tfds.builder_from_directory(str(tmp_path))
    assert builder.info.splits["train"].num_examples == 3
    example = next(iter(builder.as_dataset(split="train")))
    assert np.frombuffer(example["energy"].numpy(), "<f8")[0] == -100.0


def test_jmp_random_splits_partition_the_items():
    parts = splits.split_by_fractions(1001)
    assert [len(parts[s]) for s in splits.SPLITS] == [800, 101, 100]
    assert sorted(np.concatenate(list(parts.values()))) == list(range(1001))
    np.testing.assert_array_equal(splits.shuffled_indices(10), np.random.RandomState(42).permutation(10))
    rmd = splits.rmd17_split(1200)
    assert [len(rmd[s]) for s in splits.SPLITS] == [950, 50, 200]
    md = splits.md22_split(5000, 3000)
    assert [len(md[s]) for s in splits.SPLITS] == [2850, 150, 2000]


def test_matbench_folds_match_scikit_learn():
    # Reference outputs of scikit-learn 1.9.1 KFold / StratifiedKFold(5, shuffle=True, random_state=18012019).
    assert [t.tolist() for t in splits.kfold_test_indices(12)] == [
        [1, 7, 8], [2, 3, 10], [4, 11], [0, 5], [6, 9]]
    labels = [True, False, True, True, False, False, True, False, True, True, False, True]
    assert [t.tolist() for t in splits.stratified_kfold_test_indices(labels)] == [
        [8, 9, 10], [0, 4, 6], [2, 5], [3, 7], [1, 11]]
    fold = splits.matbench_fold_split(12, np.array([1, 7, 8]))
    assert sorted(np.concatenate([fold["train"], fold["val"]])) == [0, 2, 3, 4, 5, 6, 9, 10, 11]
    assert len(fold["train"]) == 8


def test_group_holdout_takes_whole_groups():
    sizes = {f"m{i}": i + 1 for i in range(20)}
    parts = splits.group_holdout(sizes, holdout_items=30)
    assert sorted(sum(parts.values(), [])) == sorted(sizes)
    for split in ("val", "test"):
        total = sum(sizes[k] for k in parts[split])
        assert total >= 30 and total - sizes[parts[split][-1]] < 30
