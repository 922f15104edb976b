"""Writing prepared splits: shards, their record indexes and metadata, atomically (the record schema and
codec are jmp_jax.data.records)."""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow as tf

from jmp_jax.data import metadata as metadata_lib
from jmp_jax.data import record_index
from jmp_jax.data.records import (RecordError, encode_example, load_metadata, metadata_path, shard_paths, skip_reason,
                                  split_prefix)

DEFAULT_RECORDS_PER_SHARD = 10_000


def write_split(
    records: Iterable[dict],
    output_dir: str,
    source: str,
    split: str,
    *,
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    units: dict,
    source_files: list[str],
    extra_metadata: dict | None = None,
    energy_kind: str = "total",
) -> dict:
    """Writes one split's shards, their record indexes and metadata atomically; returns the metadata dict.

    Records that `skip_reason` rejects are counted in metadata["skipped"], never written; a split
    left with no records is an error (RecordError). Shards are written into a temporary folder
    (one a killed build left behind is removed first), then renamed into place (the earlier build's
    metadata and shards removed first); the metadata file is renamed last, so its presence marks a
    complete split. Rebuilding from the same input gives byte-identical files, also when
    data_prep.beam_build writes the shards in parallel (statistics are merged shard by shard).
    `energy_kind` ("total" or "referenced") says which energy the records hold (metadata["energy_kind"]).
    """
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    with split_tmp_dir(output_dir, source, split) as tmp_dir:
        stats = metadata_lib.SplitStats()
        num_shards = 0
        for shard_records in shard_runs(kept_records(records, stats), records_per_shard):
            stats.merge(write_tmp_shard(shard_records, tmp_dir, num_shards), f"shard {num_shards}")
            num_shards += 1
        return commit_split(tmp_dir, stats, num_shards, output_dir, source, split, units=units,
                            source_files=source_files, extra_metadata=extra_metadata, energy_kind=energy_kind)


@contextlib.contextmanager
def split_tmp_dir(output_dir: str, source: str, split: str) -> Iterator[str]:
    """A new temporary folder in `output_dir` for the shards of a split being built, removed on exit;
    one that a killed build of the same split left behind is removed first."""
    tmp_prefix = f".tmp-{source}-{split}-"
    try:
        os.makedirs(output_dir, exist_ok=True)
        # mkdtemp appends 8 characters: this matches no other split's folder.
        for stale in glob.glob(os.path.join(glob.escape(output_dir), glob.escape(tmp_prefix) + "?" * 8)):
            shutil.rmtree(stale)
        tmp_dir = tempfile.mkdtemp(prefix=tmp_prefix, dir=output_dir)
    except OSError as err:
        raise OSError(f"cannot write the split {source}-{split} to {output_dir}: {err.strerror or err}") from None
    try:
        yield tmp_dir
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def kept_records(records: Iterable[dict], stats: metadata_lib.SplitStats) -> Iterator[dict]:
    """The records that `skip_reason` accepts; the others are counted in `stats`."""
    for record in records:
        reason = skip_reason(record)
        if reason is None:
            yield record
        else:
            stats.skip(reason)


def shard_runs(records: Iterable[dict], records_per_shard: int) -> Iterator[Iterator[dict]]:
    """The records of each shard in turn, `records_per_shard` (the last run fewer); read each run to its end
    before taking the next."""
    records = iter(records)
    for first in records:
        yield itertools.chain([first], itertools.islice(records, records_per_shard - 1))


def write_shard(path: str, serialized_records: Iterable[bytes]) -> None:
    """Writes one TFRecord shard holding `serialized_records` in order (every build writes through here)."""
    with tf.io.TFRecordWriter(path) as writer:
        for serialized in serialized_records:
            writer.write(serialized)


def tmp_shard_path(tmp_dir: str, shard: int) -> str:
    return os.path.join(tmp_dir, f"shard-{shard:05d}")


def write_tmp_shard(records: Iterable[dict], tmp_dir: str, shard: int) -> metadata_lib.SplitStats:
    """Encodes `records` (kept ones, in split order) as shard number `shard` into `tmp_dir`, with its record
    index beside it (`record_index.index_path`); returns their statistics."""
    stats = metadata_lib.SplitStats()
    natoms = []

    def serialized():
        for record in records:
            stats.add(record)
            natoms.append(record["atomic_numbers"].shape[0])
            yield encode_example(record)

    path = tmp_shard_path(tmp_dir, shard)
    write_shard(path, serialized())
    record_index.write_index(path, natoms)
    return stats


def commit_split(
    tmp_dir: str,
    stats: metadata_lib.SplitStats,
    num_shards: int,
    output_dir: str,
    source: str,
    split: str,
    *,
    units: dict,
    source_files: list[str],
    extra_metadata: dict | None,
    energy_kind: str,
) -> dict:
    """Moves the shards `tmp_shard_path(tmp_dir, 0 .. num_shards - 1)` into place, then writes the metadata
    of their `stats` (see write_split); returns the metadata dict."""
    if not num_shards:
        skipped = {reason: n for reason, n in stats.skipped.items() if n}
        raise RecordError(f"{source}-{split}: no records to write "
                          f"({f'every one skipped: {skipped}' if skipped else 'the input holds none'})")
    meta = stats.finalize(units=units, source_files=source_files, energy_kind=energy_kind)
    meta.update({"source": source, "split": split, "num_shards": num_shards})
    meta.update(extra_metadata or {})
    # Drop the old metadata first: until the new one lands, the split reads as absent.
    if os.path.exists(metadata_path(output_dir, source, split)):
        os.remove(metadata_path(output_dir, source, split))
    for stale in shard_paths(output_dir, source, split):
        os.remove(stale)
        if os.path.exists(record_index.index_path(stale)):
            os.remove(record_index.index_path(stale))
    prefix = split_prefix(output_dir, source, split)
    for index in range(num_shards):
        tmp, shard = tmp_shard_path(tmp_dir, index), f"{prefix}.tfrecord-{index:05d}-of-{num_shards:05d}"
        os.replace(record_index.index_path(tmp), record_index.index_path(shard))
        os.replace(tmp, shard)
    tmp_meta = os.path.join(tmp_dir, "metadata.json")
    with open(tmp_meta, "w") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp_meta, metadata_path(output_dir, source, split))
    return meta


def describe_for_tfds(output_dir: str, source: str, split: str) -> None:
    """Writes TFDS metadata (features.json, dataset_info.json) so that
    tfds.builder_from_directory(output_dir) can read the splits of `source`.

    TFDS keeps one dataset per folder, so `output_dir` should hold one source only.
    Float64 scalars appear as raw 8-byte strings there (TFDS stores floats as float32).
    """
    import tensorflow_datasets as tfds  # slow import; only needed here

    meta = load_metadata(output_dir, source, split)
    features = {
        "atomic_numbers": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "positions": tfds.features.Tensor(shape=(None,), dtype=np.float32),
        "cell": tfds.features.Tensor(shape=(9,), dtype=np.float32),
        "pbc": tfds.features.Tensor(shape=(3,), dtype=np.int64),
        "tags": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "fixed": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "natoms": tfds.features.Tensor(shape=(1,), dtype=np.int64),
        "source_id": tfds.features.Text(),
    }
    if meta["has_forces"]:
        features["forces"] = tfds.features.Tensor(shape=(None,), dtype=np.float32)
    for name in (["energy"] if meta["has_energy"] else []) + list(meta["target_names"]):
        features[name] = tfds.features.Tensor(shape=(), dtype=np.bytes_)
    template = tfds.core.ShardedFileTemplate(
        data_dir=output_dir,
        template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name=source,
        filetype_suffix="tfrecord",
    )
    tfds.folder_dataset.write_metadata(
        data_dir=output_dir,
        features=tfds.features.FeaturesDict(features),
        split_infos=tfds.folder_dataset.compute_split_info(filename_template=template),
        filename_template=template,
        check_data=False,
        description=f"{source}: atomistic structures prepared by data_prep.build",
    )


def summarize(meta: dict) -> dict[str, Any]:
    """Short human-readable view of a split's metadata (for the CLI)."""
    keys = ("source", "split", "num_records", "num_shards", "skipped")
    return {k: meta[k] for k in keys if k in meta}
