"""Random access into TFRecord shards through an offset index, so the pipeline can be resumed exactly.

TFRecord framing per record: uint64 length, uint32 masked CRC of the length, payload, uint32 masked CRC of
the payload. Scanning only the length headers indexes a shard without reading the payloads.

Every shard's CRCs are checked once per process when a source opens it (`verify_shard`), by TensorFlow's
native reader in one batched pass: about 7 µs per record (~350 MB/s) measured on a 48 MB, 20,000-record
split, against ~47 µs to decode a record and milliseconds to build its graphs.
"""
from __future__ import annotations

import itertools
import os
import struct
from typing import Callable, Iterator, Sequence

import numpy as np

HEADER_BYTES = 12
FOOTER_BYTES = 4
VERIFY_BATCH = 4096  # records per step of the checksum pass; batching keeps TensorFlow's per-step cost low

# (real path, size, mtime) of the shards whose checksums passed in this process: a split opened again
# (training, then validation set-up) is not read twice.
_verified: set[tuple[str, int, int]] = set()


class CorruptShardError(ValueError):
    """A shard whose framing or payload cannot be read."""


def _frames(path: str) -> Iterator[tuple[int, int]]:
    """(payload offset, payload length) of each record of one shard, from its length headers."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES:
                raise CorruptShardError(f"{path}: truncated record header at byte {pos}")
            (length,) = struct.unpack("<Q", header[:8])
            end = pos + HEADER_BYTES + length + FOOTER_BYTES
            if end > size:
                raise CorruptShardError(f"{path}: record at byte {pos} claims {length} bytes, past the end "
                                        f"of the file ({size} bytes)")
            yield pos + HEADER_BYTES, length
            pos = end
            f.seek(pos)


def index_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Payload offsets and lengths (int64) of every record in one shard."""
    frames = np.asarray(list(_frames(path)), np.int64).reshape(-1, 2)
    return frames[:, 0], frames[:, 1]


def _stored_source_id(path: str, record: int, decode: Callable[[bytes], dict]) -> str:
    """' (source id ...)' of a shard's record as its (unverified) bytes say, or '' if they do not decode."""
    try:
        offset, length = next(itertools.islice(_frames(path), record, None))
        with open(path, "rb") as f:
            f.seek(offset)
            return f" (source id {decode(f.read(length))['source_id']!r} as stored)"
    except Exception:  # damaged framing or payload: the message names the record by index alone
        return ""


def verify_shard(path: str, decode: Callable[[bytes], dict]) -> None:
    """Check the masked CRC-32C of every record's length and payload (TensorFlow's reader checks both).

    Raises CorruptShardError naming the shard, the first damaged record's index in it and its source id.
    """
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _verified:
        return
    import tensorflow as tf  # slow import; only needed here

    dataset = tf.data.TFRecordDataset(path)
    try:
        dataset.batch(VERIFY_BATCH).reduce(np.int64(0), lambda n, batch: n + tf.size(batch, out_type=tf.int64))
    except tf.errors.OpError:
        # Records come in order and each is checked before it is returned: count the good ones.
        record = 0
        try:
            for _ in dataset:
                record += 1
        except tf.errors.OpError:
            pass
        raise CorruptShardError(f"{path}: record {record}{_stored_source_id(path, record, decode)} fails its "
                                f"checksum (the shard is damaged; rebuild the split)") from None
    _verified.add(key)


class TFRecordSource:
    """Records of several shards addressed by one global index; `decode` turns payload bytes into a record.

    Every shard's checksums are verified when the source opens (`verify_shard`)."""

    def __init__(self, paths: Sequence[str], decode: Callable[[bytes], dict]):
        if not paths:
            raise ValueError("TFRecordSource: no shard files given")
        self.paths = list(paths)
        self.decode = decode
        for path in self.paths:
            verify_shard(path, decode)
        per_shard = [index_shard(p) for p in self.paths]
        self._shard = np.concatenate([np.full(len(o), i, np.int32) for i, (o, _) in enumerate(per_shard)])
        self._offset = np.concatenate([o for o, _ in per_shard])
        self._length = np.concatenate([n for _, n in per_shard])
        self._starts = np.cumsum([0] + [len(o) for o, _ in per_shard])  # global index of each shard's first record

    def __len__(self) -> int:
        return len(self._offset)

    def __getitem__(self, i: int) -> dict:
        path = self.paths[self._shard[i]]
        with open(path, "rb") as f:
            f.seek(int(self._offset[i]))
            payload = f.read(int(self._length[i]))
        try:
            return self.decode(payload)
        except Exception as e:  # the decoder's own error types vary (protobuf, numpy)
            raise CorruptShardError(f"{path}: record {i - self._starts[self._shard[i]]} cannot be decoded: {e}") from e
