"""Writes the missing record indexes of splits prepared before indexes existed (the format and reader are
jmp_jax/data/record_index.py): `python -m data_prep.record_index DIR`."""
from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
import tensorflow as tf

from jmp_jax.data import records
from jmp_jax.data.record_index import RecordIndexError, index_path, write_index

SCAN_BATCH = 4096  # records per step of the TensorFlow pass that indexes an old split


def _scan_natoms(shard_path: str) -> np.ndarray:
    """Atom counts of a shard's records, read by TensorFlow, which checks every record's CRC-32C."""
    spec = {"natoms": tf.io.FixedLenFeature([1], tf.int64)}
    try:
        counts = [tf.io.parse_example(batch, spec)["natoms"].numpy().reshape(-1)
                  for batch in tf.data.TFRecordDataset(shard_path).batch(SCAN_BATCH)]
    except tf.errors.OpError as err:
        raise RecordIndexError(f"{shard_path}: cannot be indexed: {err.message}") from None
    return np.concatenate(counts) if counts else np.zeros(0, np.int64)


def write_missing(data_dir: str) -> list[str]:
    """Writes the index of every shard of the splits in `data_dir` that has none; returns the indexes written."""
    written = []
    for meta_path in sorted(glob.glob(os.path.join(glob.escape(data_dir), "*" + records.METADATA_SUFFIX))):
        with open(meta_path) as f:
            meta = json.load(f)
        for shard in records.shard_paths(data_dir, meta["source"], meta["split"]):
            if not os.path.exists(index_path(shard)):
                written.append(write_index(shard, _scan_natoms(shard)))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the record index of every shard in a folder of "
                                                 "prepared splits that has none (splits built before indexes).")
    parser.add_argument("data_dir")
    args = parser.parse_args(argv)
    written = write_missing(args.data_dir)
    print(f"wrote {len(written)} record indexes in {args.data_dir}")


if __name__ == "__main__":
    main()
