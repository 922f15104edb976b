"""Per-shard record indexes, written beside the shards at build time so that opening a split reads
16 bytes per record instead of scanning every shard.

`<source>-<split>.tfrecord-XXXXX-of-YYYYY.index` indexes the shard `<source>-<split>.tfrecord-XXXXX-of-YYYYY`. Layout,
little-endian: a 32-byte header (magic, record count, the shard's size in bytes, zlib CRC-32 of the body),
then the body: int64 frame offsets (n), uint32 zlib CRC-32 of each record's whole frame (n), int32 atom
counts (n). A frame is TFRecord's length header, payload and footer; the record's bytes are the frame
between the two offsets (the last one ends at the shard's size).

Integrity: the frame CRC-32s let a reader verify each record when it reads it (`zlib.crc32` runs at C
speed; the frame's own masked CRC-32C would need a CRC-32C the Python standard library lacks), so a
checksum costs time in proportion to the records read, not to the split's size, and no record is used
unverified. The body CRC and the stored shard size catch a damaged, truncated or stale index at load.

Splits prepared before these indexes existed: `python -m data_prep.record_index DIR` writes the missing
ones, checking every record's TFRecord CRC-32C on the way; readers refuse a split without them.
"""
from __future__ import annotations

import dataclasses
import os
import struct
import zlib
from typing import Sequence

import numpy as np

MAGIC = b"JMPRIDX1"
HEADER = struct.Struct("<8sQQI4x")  # magic, records, shard bytes, body CRC-32 (then 4 padding bytes)
BYTES_PER_RECORD = 8 + 4 + 4  # offset, frame CRC-32, atom count
INDEX_SUFFIX = ".index"
FRAME_OVERHEAD = 16  # TFRecord: uint64 length + uint32 masked CRC of it, payload, uint32 masked CRC of it


class RecordIndexError(ValueError):
    """A record index that is missing, damaged or does not match its shard; the message names the file."""


def index_path(shard_path: str) -> str:
    """The index file of a shard: its name + `.index` (a name TFDS's shard pattern does not match)."""
    return shard_path + INDEX_SUFFIX


def frame_offsets(data: bytes | memoryview, where: str) -> np.ndarray:
    """(n,) int64 start of each TFRecord frame of a shard's bytes, from the length headers."""
    offsets, pos = [], 0
    while pos + FRAME_OVERHEAD <= len(data):
        offsets.append(pos)
        pos += FRAME_OVERHEAD + struct.unpack_from("<Q", data, pos)[0]
    if pos != len(data):
        raise RecordIndexError(f"{where}: the record framing ends at byte {pos}, the file has {len(data)}")
    return np.asarray(offsets, np.int64)


def write_index(shard_path: str, natoms: Sequence[int]) -> str:
    """Indexes a shard whose records have `natoms` atoms each, reading it once; returns the index path.

    Written to a temporary name and renamed, so a reader never sees half an index; the bytes depend
    only on the shard's bytes and `natoms`.
    """
    out_path = index_path(shard_path)
    with open(shard_path, "rb") as f:
        data = memoryview(f.read())
    offsets = frame_offsets(data, shard_path)
    natoms = np.asarray(natoms, np.int32)
    if len(natoms) != len(offsets):
        raise RecordIndexError(f"{shard_path}: {len(offsets)} records, {len(natoms)} atom counts given")
    ends = np.append(offsets[1:], len(data))
    crcs = np.fromiter((zlib.crc32(data[o:e]) for o, e in zip(offsets.tolist(), ends.tolist())), np.uint32,
                       count=len(offsets))
    body = [offsets.astype("<i8").tobytes(), crcs.astype("<u4").tobytes(), natoms.astype("<i4").tobytes()]
    crc = zlib.crc32(body[2], zlib.crc32(body[1], zlib.crc32(body[0])))
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(HEADER.pack(MAGIC, len(offsets), len(data), crc))
        f.writelines(body)
    os.replace(tmp, out_path)
    return out_path


@dataclasses.dataclass(frozen=True)
class SplitIndex:
    """The records of a split's shards, in order: 16 bytes per record in memory."""

    offsets: np.ndarray  # (N,) int64 frame start within its shard
    crcs: np.ndarray  # (N,) uint32 zlib CRC-32 of the frame
    natoms: np.ndarray  # (N,) int32
    starts: np.ndarray  # (S+1,) int64 global index of each shard's first record, then N
    shard_sizes: np.ndarray  # (S,) int64

    def locate(self, i: int) -> tuple[int, int, int, int]:
        """(shard, record within the shard, frame start, frame end) of global record i."""
        shard = int(np.searchsorted(self.starts, i, side="right")) - 1
        start = int(self.offsets[i])
        end = int(self.offsets[i + 1]) if i + 1 < self.starts[shard + 1] else int(self.shard_sizes[shard])
        return shard, i - int(self.starts[shard]), start, end


def _records_in(path: str) -> int:
    """Record count implied by an index file's size (header + 16 bytes per record)."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise RecordIndexError(f"{path}: no record index beside its shard (a split prepared before record "
                               f"indexes: write them with `python -m data_prep.record_index "
                               f"{os.path.dirname(path) or '.'}`)") from None
    if size < HEADER.size or (size - HEADER.size) % BYTES_PER_RECORD:
        raise RecordIndexError(f"{path}: {size} bytes is not a record index's size (truncated?); rebuild the split")
    return (size - HEADER.size) // BYTES_PER_RECORD


def load_split_index(shard_paths: Sequence[str]) -> SplitIndex:
    """Reads the index of every shard straight into split-wide arrays and checks each against its shard.

    Raises RecordIndexError naming the index file when it is missing, truncated, damaged (body CRC),
    or written for a shard of another size.
    """
    paths = [index_path(p) for p in shard_paths]
    counts = [_records_in(p) for p in paths]
    starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
    total = int(starts[-1])
    offsets, crcs, natoms = np.empty(total, "<i8"), np.empty(total, "<u4"), np.empty(total, "<i4")
    sizes = np.empty(len(paths), np.int64)
    for k, (path, shard) in enumerate(zip(paths, shard_paths)):
        lo, hi = int(starts[k]), int(starts[k + 1])
        with open(path, "rb") as f:
            magic, n, sizes[k], crc = HEADER.unpack(f.read(HEADER.size))
            parts = [offsets[lo:hi], crcs[lo:hi], natoms[lo:hi]]
            for part in parts:
                f.readinto(memoryview(part).cast("B"))
        if magic != MAGIC or n != hi - lo:
            raise RecordIndexError(f"{path}: not a record index of {hi - lo} records (bad header); rebuild the split")
        if zlib.crc32(parts[2], zlib.crc32(parts[1], zlib.crc32(parts[0]))) != crc:
            raise RecordIndexError(f"{path}: the index fails its checksum (damaged); rebuild the split")
        actual = os.path.getsize(shard)
        if actual != sizes[k]:
            raise RecordIndexError(f"{path}: indexes a shard of {sizes[k]} bytes, {shard} has {actual} "
                                   f"(stale index or damaged shard); rebuild the split")
        frames = np.diff(np.append(offsets[lo:hi], sizes[k]))
        if n and (offsets[lo] != 0 or frames.min() < FRAME_OVERHEAD):
            raise RecordIndexError(f"{path}: frame offsets do not tile the shard; rebuild the split")
    return SplitIndex(offsets, crcs, natoms, starts, sizes)
