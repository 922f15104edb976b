"""Record schema and TFRecord IO for prepared datasets.

A record in Python is a dict of numpy arrays (N atoms):
  atomic_numbers (N,) int64, positions (N, 3) float64 [Å], cell (3, 3) float64 [Å],
  pbc (3,) bool, tags (N,) int64, fixed (N,) bool, source_id str,
  optional energy float [eV], forces (N, 3) [eV/Å], targets {name: float}.

On disk each record is a tf.train.Example (written and read with `example_proto`, no TensorFlow import) with
the features listed in `FEATURE_DOC`.
Energies and scalar targets are stored as the 8 little-endian bytes of a float64 so that
total energies of large systems (~1e4 eV) keep full precision; decode them with
tf.io.decode_raw(x, tf.float64) or numpy.frombuffer(x, "<f8").

Files of one split: <source>-<split>.tfrecord-XXXXX-of-YYYYY, each with its record index
<source>-<split>.tfrecord-XXXXX-of-YYYYY.index (see jmp_jax/data/record_index.py), plus
<source>-<split>.metadata.json (see jmp_jax/data/metadata.py).
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from jmp_jax.data import example_proto
from jmp_jax.graph.validate import MAX_ABS_COORDINATE

if TYPE_CHECKING:
    import tensorflow as tf

METADATA_SUFFIX = ".metadata.json"


FLOAT64_LE = np.dtype("<f8")


# Feature name -> (on-disk type, description); scalar targets are added under their own names.
FEATURE_DOC = {
    "atomic_numbers": ("int64 list, N", "atomic numbers Z"),
    "positions": ("float32 list, N*3", "Cartesian positions, Å, row-major (N, 3)"),
    "cell": ("float32 list, 9", "lattice vectors as rows, Å; zeros for molecules"),
    "pbc": ("int64 list, 3", "periodic axes (0/1)"),
    "tags": ("int64 list, N", "0 sub-surface, 1 surface, 2 adsorbate/molecule"),
    "fixed": ("int64 list, N", "1 where the atom was held fixed in the DFT run"),
    "natoms": ("int64 list, 1", "N"),
    "forces": ("float32 list, N*3", "forces, eV/Å (only in splits that have them)"),
    "energy": ("bytes, 8", "float64 little-endian, eV (only in splits that have it)"),
    "source_id": ("bytes", "identifier of the structure in the distributed files"),
}


class RecordError(ValueError):
    """A record (or input structure) is malformed; the message names it."""


class CorruptShardError(ValueError):
    """A TFRecord shard failed its checksum or could not be parsed; the message names the file."""


def make_record(
    atomic_numbers,
    positions,
    *,
    source_id: str,
    cell=None,
    pbc=None,
    tags=None,
    fixed=None,
    energy: float | None = None,
    forces=None,
    targets: dict[str, float] | None = None,
) -> dict:
    """Builds a validated record dict. Molecules: cell zeros, pbc False, tags 2, fixed False.

    atomic_numbers (N,), positions (N, 3), cell (3, 3), pbc (3,), tags (N,), fixed (N,),
    forces (N, 3). Raises RecordError naming `source_id` on inconsistent shapes or Z outside 1..118.
    """
    z = np.asarray(atomic_numbers, dtype=np.int64).reshape(-1)
    n = z.shape[0]
    record = {
        "atomic_numbers": z,
        "positions": np.asarray(positions, dtype=np.float64),
        "cell": np.zeros((3, 3)) if cell is None else np.asarray(cell, dtype=np.float64),
        "pbc": np.zeros(3, bool) if pbc is None else np.broadcast_to(np.asarray(pbc, bool), (3,)).copy(),
        "tags": np.full(n, 2, np.int64) if tags is None else np.asarray(tags, dtype=np.int64).reshape(-1),
        "fixed": np.zeros(n, bool) if fixed is None else np.asarray(fixed, dtype=bool).reshape(-1),
        "source_id": str(source_id),
    }
    if energy is not None:
        record["energy"] = float(energy)
    if forces is not None:
        record["forces"] = np.asarray(forces, dtype=np.float64)
    if targets:
        record["targets"] = {k: float(v) for k, v in targets.items()}
    _check_shapes(record)
    return record


def _check_shapes(record: dict) -> None:
    z = record["atomic_numbers"]
    if z.size and (z.min() < 1 or z.max() > 118):
        raise RecordError(f"record {record['source_id']!r}: atomic numbers outside 1..118: {sorted(set(z.tolist()))}")
    n = z.shape[0]
    expected = {"positions": (n, 3), "cell": (3, 3), "tags": (n,), "fixed": (n,), "forces": (n, 3)}
    for key, shape in expected.items():
        if key in record and record[key].shape != shape:
            raise RecordError(
                f"record {record['source_id']!r}: {key} has shape {record[key].shape}, expected {shape}"
            )


def skip_reason(record: dict) -> str | None:
    """Why a record must not be written (None if it is fine): no atoms, NaN positions/labels, coordinates
    or lattice vectors beyond MAX_ABS_COORDINATE."""
    if record["atomic_numbers"].shape[0] == 0:
        return "no_atoms"
    if not np.all(np.isfinite(record["positions"])) or not np.all(np.isfinite(record["cell"])):
        return "nan_positions"
    if max(np.abs(record["positions"]).max(), np.abs(record["cell"]).max()) > MAX_ABS_COORDINATE:
        return "far_positions"
    labels = [record.get("energy", 0.0), *record.get("targets", {}).values()]
    if not np.all(np.isfinite(labels)) or ("forces" in record and not np.all(np.isfinite(record["forces"]))):
        return "nan_labels"
    return None


def _int64(values) -> example_proto.Feature:
    return example_proto.Feature(int64_list=example_proto.Int64List(value=np.asarray(values, np.int64).reshape(-1)))


def _float(values) -> example_proto.Feature:
    return example_proto.Feature(float_list=example_proto.FloatList(value=np.asarray(values, np.float32).reshape(-1)))


def _bytes(value: bytes) -> example_proto.Feature:
    return example_proto.Feature(bytes_list=example_proto.BytesList(value=[value]))


def float64_bytes(value: float) -> bytes:
    """8 little-endian bytes of a float64."""
    return np.asarray(value, FLOAT64_LE).tobytes()


def encode_example(record: dict) -> bytes:
    """Record dict -> serialized tf.train.Example."""
    features = {
        "atomic_numbers": _int64(record["atomic_numbers"]),
        "positions": _float(record["positions"]),
        "cell": _float(record["cell"]),
        "pbc": _int64(record["pbc"]),
        "tags": _int64(record["tags"]),
        "fixed": _int64(record["fixed"]),
        "natoms": _int64([record["atomic_numbers"].shape[0]]),
        "source_id": _bytes(record["source_id"].encode("utf-8")),
    }
    if "energy" in record:
        features["energy"] = _bytes(float64_bytes(record["energy"]))
    if "forces" in record:
        features["forces"] = _float(record["forces"])
    for name, value in record.get("targets", {}).items():
        if name in features:
            raise RecordError(f"record {record['source_id']!r}: target name {name!r} clashes with a feature")
        features[name] = _bytes(float64_bytes(value))
    # Deterministic: the feature map is otherwise serialised in a per-process hash order.
    return example_proto.Example(features=example_proto.Features(feature=features)).SerializeToString(
        deterministic=True)


def decode_example(serialized: bytes) -> dict:
    """Serialized tf.train.Example -> record dict (numpy). Every feature outside the fixed
    schema is a float64 scalar target."""
    feature = example_proto.Example.FromString(serialized).features.feature
    record = {
        "atomic_numbers": np.asarray(feature["atomic_numbers"].int64_list.value, np.int64),
        "positions": np.asarray(feature["positions"].float_list.value, np.float64).reshape(-1, 3),
        "cell": np.asarray(feature["cell"].float_list.value, np.float64).reshape(3, 3),
        "pbc": np.asarray(feature["pbc"].int64_list.value, np.int64).astype(bool),
        "tags": np.asarray(feature["tags"].int64_list.value, np.int64),
        "fixed": np.asarray(feature["fixed"].int64_list.value, np.int64).astype(bool),
        "source_id": feature["source_id"].bytes_list.value[0].decode("utf-8"),
    }
    if "energy" in feature:
        record["energy"] = _decode_float64(feature["energy"])
    if "forces" in feature:
        record["forces"] = np.asarray(feature["forces"].float_list.value, np.float64).reshape(-1, 3)
    targets = {name: _decode_float64(feature[name]) for name in sorted(feature) if name not in FEATURE_DOC}
    if targets:
        record["targets"] = targets
    return record


def _decode_float64(feature: example_proto.Feature) -> float:
    return float(np.frombuffer(feature.bytes_list.value[0], FLOAT64_LE)[0])


def split_prefix(output_dir: str, source: str, split: str) -> str:
    return os.path.join(output_dir, f"{source}-{split}")


def metadata_path(output_dir: str, source: str, split: str) -> str:
    return split_prefix(output_dir, source, split) + METADATA_SUFFIX


def shard_paths(output_dir: str, source: str, split: str) -> list[str]:
    """Existing shard files of a split, in shard order (the pattern ends in a digit: not their indexes)."""
    return sorted(glob.glob(glob.escape(split_prefix(output_dir, source, split)) + ".tfrecord-*-of-*[0-9]"))


def load_metadata(output_dir: str, source: str, split: str) -> dict:
    path = metadata_path(output_dir, source, split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no prepared split {source}-{split} in {output_dir} (missing {path})")
    with open(path) as f:
        return json.load(f)


def split_shards(output_dir: str, source: str, split: str) -> tuple[list[str], dict]:
    """Shard files and metadata of a split; raises CorruptShardError when shards are missing or extra."""
    meta = load_metadata(output_dir, source, split)
    paths = shard_paths(output_dir, source, split)
    if len(paths) != meta["num_shards"]:
        raise CorruptShardError(
            f"{source}-{split}: metadata lists {meta['num_shards']} shards, found {len(paths)} in {output_dir}"
        )
    return paths, meta


def check_record_count(meta: dict, found: int, output_dir: str) -> None:
    """Raises CorruptShardError unless the shards hold the metadata's number of records."""
    if found != meta["num_records"]:
        raise CorruptShardError(f"{meta['source']}-{meta['split']}: metadata lists {meta['num_records']} records, "
                                f"the shards in {output_dir} hold {found}")


def _serialized_batches(output_dir: str, source: str, split: str, batch_size: int = 256) -> Iterator[np.ndarray]:
    """(<= batch_size,) arrays of serialized examples, shard by shard; batching keeps the
    per-record Python overhead low while each shard is still read on its own, so that a
    checksum failure can be reported with the shard's file name."""
    import tensorflow as tf  # tf.data's reader checks each record's CRC; training reads through record indexes
    paths, meta = split_shards(output_dir, source, split)
    found = 0
    for path in paths:
        try:
            for batch in tf.data.TFRecordDataset(path).batch(batch_size):
                found += len(batch)
                yield batch.numpy()
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as err:
            raise CorruptShardError(f"corrupt TFRecord shard {path} (after record {found} of the split): "
                                    f"{err.message}") from err
    check_record_count(meta, found, output_dir)


def iterate_records(output_dir: str, source: str, split: str) -> Iterator[dict]:
    """Numpy record dicts of a prepared split, in stored order."""
    for batch in _serialized_batches(output_dir, source, split):
        for serialized in batch:
            yield decode_example(serialized)


def feature_spec(meta: dict) -> dict:
    """tf.io parse spec for a split described by its metadata."""
    import tensorflow as tf
    spec = {
        "atomic_numbers": tf.io.RaggedFeature(tf.int64),
        "positions": tf.io.RaggedFeature(tf.float32),
        "cell": tf.io.FixedLenFeature([9], tf.float32),
        "pbc": tf.io.FixedLenFeature([3], tf.int64),
        "tags": tf.io.RaggedFeature(tf.int64),
        "fixed": tf.io.RaggedFeature(tf.int64),
        "natoms": tf.io.FixedLenFeature([1], tf.int64),
        "source_id": tf.io.FixedLenFeature([], tf.string),
    }
    if meta["has_energy"]:
        spec["energy"] = tf.io.FixedLenFeature([], tf.string)
    if meta["has_forces"]:
        spec["forces"] = tf.io.RaggedFeature(tf.float32)
    for name in meta["target_names"]:
        spec[name] = tf.io.FixedLenFeature([], tf.string)
    return spec


def read_split(output_dir: str, source: str, split: str) -> tf.data.Dataset:
    """tf.data.Dataset of parsed records: positions/forces (N, 3), cell (3, 3), energies float64.

    Shards are read one by one so that a corrupt one raises CorruptShardError naming it.
    """
    import tensorflow as tf
    meta = load_metadata(output_dir, source, split)
    spec = feature_spec(meta)
    float64_names = [name for name in ("energy", *meta["target_names"]) if name in spec]

    def parse(serialized):
        ex = tf.io.parse_single_example(serialized, spec)
        ex["positions"] = tf.reshape(ex["positions"], [-1, 3])
        ex["cell"] = tf.reshape(ex["cell"], [3, 3])
        if "forces" in ex:
            ex["forces"] = tf.reshape(ex["forces"], [-1, 3])
        for name in float64_names:
            ex[name] = tf.reshape(tf.io.decode_raw(ex[name], tf.float64, little_endian=True), [])
        return ex

    raw = tf.data.Dataset.from_generator(
        lambda: _serialized_batches(output_dir, source, split),
        output_signature=tf.TensorSpec([None], tf.string),
    )
    return raw.unbatch().map(parse)
