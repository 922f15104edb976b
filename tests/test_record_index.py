"""Record indexes written by the build: what they hold, and the atom counts they give training's set-up."""
import numpy as np

from data_prep import shard_writer
from jmp_jax.data import record_index, records
from jmp_jax.data import budget_plan, task_data


def test_index_holds_each_records_frame_and_atom_count_and_gives_the_largest_structures(tmp_path):
    sizes = [3, 5, 2, 5, 4, 1, 5, 2, 3, 4, 2]
    recs = [records.make_record(np.full(n, 6), np.arange(3 * n, dtype=float).reshape(n, 3), source_id=f"s{i}",
                                energy=-1.0, forces=np.zeros((n, 3))) for i, n in enumerate(sizes)]
    shard_writer.write_split(recs, str(tmp_path), "toy", "train", records_per_shard=4, units={}, source_files=[])
    shards = records.shard_paths(str(tmp_path), "toy", "train")
    index = record_index.load_split_index(shards)
    np.testing.assert_array_equal(index.natoms, sizes)
    np.testing.assert_array_equal(index.starts, [0, 4, 8, 11])
    for i in range(len(sizes)):
        shard, within, start, end = index.locate(i)
        frame = open(shards[shard], "rb").read()[start:end]
        assert (shard, within) == divmod(i, 4)
        assert records.decode_example(frame[12:-4])["source_id"] == f"s{i}"
    source = task_data.open_source(str(tmp_path), "toy", "train")
    largest = budget_plan.largest_structures(source)  # from the index's atom counts
    np.testing.assert_array_equal(largest, np.argsort(-np.asarray(sizes), kind="stable")[:8])
    assert largest.tolist() == budget_plan.largest_structures([source[i] for i in range(len(sizes))]).tolist()


def test_a_split_opened_again_shares_its_index_until_its_files_change(tmp_path):
    recs = [records.make_record([8, 1, 1], np.eye(3), source_id=f"w{i}", energy=-1.0, forces=np.zeros((3, 3)))
            for i in range(5)]
    shard_writer.write_split(recs, str(tmp_path), "toy", "train", records_per_shard=2, units={}, source_files=[])
    first = task_data.open_source(str(tmp_path), "toy", "train")
    assert task_data.open_source(str(tmp_path), "toy", "train").index is first.index
    shard_writer.write_split(recs[:4], str(tmp_path), "toy", "train", records_per_shard=2, units={}, source_files=[])
    rebuilt = task_data.open_source(str(tmp_path), "toy", "train")
    assert rebuilt.index is not first.index and len(rebuilt) == 4
