"""Fault injection into prepared splits: every read path (training set-up, pipelines, evaluation) refuses a
damaged or incomplete split, or a damaged record index, with an error naming the file (the shard, the record
and its source id for a damaged record, caught when the record is read)."""
import os
import struct

import numpy as np
import pytest
from ase.build import molecule

from configs import pretrain_common
from data_prep import record_index as record_index_tool, shard_writer
from jmp_jax.data import record_index, records
from experiments import evaluate
from jmp_jax.data import task_data

NAMES = ("H2O", "NH3", "CH4", "C2H6", "CH3OH", "HCN", "C2H4")


def _split(tmp_path, n=7, records_per_shard=3) -> str:
    recs = []
    for i in range(n):
        atoms = molecule(NAMES[i % len(NAMES)])
        recs.append(records.make_record(atoms.numbers, atoms.positions, source_id=f"mol{i}", energy=-float(i),
                                        forces=np.zeros((len(atoms), 3))))
    shard_writer.write_split(recs, str(tmp_path), "toy", "train", records_per_shard=records_per_shard,
                        units={"energy": "eV"}, source_files=[])
    return str(tmp_path)


def _payload(path: str, record: int) -> tuple[int, int]:
    """(offset, length) of a record's payload in its shard, from the shard's record index."""
    _, _, start, end = record_index.load_split_index([path]).locate(record)
    return start + 12, end - start - 16


def _edit(path: str, edit) -> None:
    data = bytearray(open(path, "rb").read())
    edit(data)
    open(path, "wb").write(bytes(data))


def _training_config(data_dir: str):
    config = pretrain_common.pretrain_config("jmp_s")
    config.data.dir = data_dir
    config.data.tasks = [dict(pretrain_common.DEFAULT_TASKS[1], name="toy", source="toy", linear_reference=False)]
    return config


def test_flipped_coordinate_byte_is_caught_naming_shard_record_and_source_id(tmp_path):
    data_dir = _split(tmp_path)
    shard = records.shard_paths(data_dir, "toy", "train")[1]  # records mol3, mol4, mol5
    offset, length = _payload(shard, 1)
    stored = records.decode_example(open(shard, "rb").read()[offset:offset + length])["positions"]
    coordinate = struct.pack("<f", np.float32(stored[1, 0]))  # a coordinate of atom 1 of mol4, as stored

    def flip(data):
        at = data.index(coordinate, offset)
        data[at + 2] ^= 0x10  # one bit of the float32's mantissa: the structure stays plausible

    _edit(shard, flip)
    expected = rf"{os.path.basename(shard)}: record 1 \(source id 'mol4' as stored\) fails its checksum"
    source = task_data.open_source(data_dir, "toy", "train")
    assert source[3]["source_id"] == "mol3"  # the records beside it still read
    with pytest.raises(records.CorruptShardError, match=expected):
        source[4]
    with pytest.raises(records.CorruptShardError, match=expected):
        evaluate.read_records(data_dir, "toy", "train")


def test_flipped_length_header_byte_is_caught(tmp_path):
    data_dir = _split(tmp_path)
    shard = records.shard_paths(data_dir, "toy", "train")[0]
    offset, _ = _payload(shard, 2)
    _edit(shard, lambda data: data.__setitem__(offset - 12, data[offset - 12] ^ 0x01))
    with pytest.raises(records.CorruptShardError, match=rf"{os.path.basename(shard)}: record 2 .*checksum"):
        task_data.open_source(data_dir, "toy", "train")[2]


def test_deleted_shard_stops_training_set_up(tmp_path):
    data_dir = _split(tmp_path)
    os.remove(records.shard_paths(data_dir, "toy", "train")[1])
    with pytest.raises(records.CorruptShardError, match="toy-train: metadata lists 3 shards, found 2"):
        task_data.load_tasks(_training_config(data_dir))


def test_shard_cut_at_a_record_boundary_is_caught_by_its_index_and_the_record_count(tmp_path):
    data_dir = _split(tmp_path)
    cut = records.shard_paths(data_dir, "toy", "train")[0]
    first_two = _payload(cut, 2)[0] - 12
    size = os.path.getsize(cut)
    _edit(cut, lambda data: data.__delitem__(slice(first_two, None)))  # drop mol2; the checksums still pass
    index = record_index.index_path(cut)
    with pytest.raises(record_index.RecordIndexError,
                       match=rf"^{index}: indexes a shard of {size} bytes, {cut} has {first_two} "):
        task_data.open_source(data_dir, "toy", "train")
    with pytest.raises(records.CorruptShardError, match="metadata lists 7 records"):
        list(records.iterate_records(data_dir, "toy", "train"))


def test_opening_a_split_reads_its_indexes_not_its_records(tmp_path):
    data_dir = _split(tmp_path)
    shard = records.shard_paths(data_dir, "toy", "train")[1]
    _edit(shard, lambda data: data.__setitem__(slice(None), bytes(len(data))))  # every byte zero, same size
    source = task_data.open_source(data_dir, "toy", "train")
    assert len(source) == 7
    np.testing.assert_array_equal(source.natoms, [len(molecule(NAMES[i])) for i in range(7)])
    assert source[6]["source_id"] == "mol6"
    with pytest.raises(records.CorruptShardError, match=rf"{os.path.basename(shard)}: record 0 fails"):
        source[3]


@pytest.mark.parametrize("damage, message", [
    (lambda data: data.__setitem__(40, data[40] ^ 0x04), "the index fails its checksum"),
    (lambda data: data.__delitem__(slice(-3, None)), "is not a record index's size"),
    (lambda data: data.__setitem__(slice(0, 8), b"JMPRIDX0"), "not a record index of 3 records"),
])
def test_damaged_index_is_a_one_line_error_naming_it(tmp_path, damage, message):
    data_dir = _split(tmp_path)
    index = record_index.index_path(records.shard_paths(data_dir, "toy", "train")[1])
    _edit(index, damage)
    with pytest.raises(record_index.RecordIndexError, match=rf"^{index}: [^\n]*{message}[^\n]*$"):
        task_data.open_source(data_dir, "toy", "train")


def test_split_without_indexes_is_refused_until_they_are_written(tmp_path):
    data_dir = _split(tmp_path)
    shards = records.shard_paths(data_dir, "toy", "train")
    built = {shard: open(record_index.index_path(shard), "rb").read() for shard in shards}
    for shard in shards:
        os.remove(record_index.index_path(shard))
    with pytest.raises(record_index.RecordIndexError,
                       match=rf"^{record_index.index_path(shards[0])}: no record index .*"
                             rf"`python -m data_prep.record_index {data_dir}`\)$"):
        task_data.open_source(data_dir, "toy", "train")
    record_index_tool.main([data_dir])
    assert {shard: open(record_index.index_path(shard), "rb").read() for shard in shards} == built
    assert [task_data.open_source(data_dir, "toy", "train")[i]["source_id"] for i in (0, 6)] == ["mol0", "mol6"]
