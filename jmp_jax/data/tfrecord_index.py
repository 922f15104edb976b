"""Random access into TFRecord shards through their record indexes, so the pipeline can be resumed exactly.

Opening a split reads the indexes written beside its shards at build time (jmp_jax/data/record_index.py):
16 bytes per record, no record header touched, so start-up does not grow with the shards' size.

Each record is verified when it is read: its whole frame (length header, payload, footer) comes in one read
and must match the CRC-32 its index stored. Why per record rather than per shard: a shuffled run touches
every shard within its first steps, so a per-shard check would read the whole dataset at each start on each
host, where this costs time in proportion to what is read, and no record is used unchecked. Measured on
386-byte records (2 busy cores): CRC-32 of the frame 0.3 µs, opening the shard + pread 16 µs, decoding
115 µs; building the record's graphs takes milliseconds.
"""
from __future__ import annotations

import os
import zlib
from typing import Callable, Sequence

from jmp_jax.data import record_index
from jmp_jax.data.records import CorruptShardError

HEADER_BYTES = 12
FOOTER_BYTES = 4
# Splits opened more than once in a process (set-up, training and validation pipelines) load their indexes
# once: the last few loaded stay, keyed by their files' identity, so a split rebuilt since is loaded anew.
CACHED_SPLITS = 8
_loaded: dict[tuple, record_index.SplitIndex] = {}


def _stored_source_id(payload: bytes, decode: Callable[[bytes], dict]) -> str:
    """' (source id ...)' of a record as its (unverified) bytes say, or '' if they do not decode."""
    try:
        return f" (source id {decode(payload)['source_id']!r} as stored)"
    except Exception:  # damaged framing or payload: the message names the record by index alone
        return ""


def _files_key(paths: Sequence[str]) -> tuple:
    """(real path, size, mtime) of every shard and its index."""
    key = []
    for path in paths:
        for name in (path, record_index.index_path(path)):
            try:
                stat = os.stat(name)
            except FileNotFoundError:  # load_split_index names it
                return ()
            key.append((os.path.realpath(name), stat.st_size, stat.st_mtime_ns))
    return tuple(key)


def load_index(paths: Sequence[str]) -> record_index.SplitIndex:
    """The split's index, loaded once per process while its files are unchanged."""
    key = _files_key(paths)
    if key not in _loaded:
        index = record_index.load_split_index(paths)  # raises naming a missing file (key empty)
        while len(_loaded) >= CACHED_SPLITS:
            del _loaded[next(iter(_loaded))]
        _loaded[key] = index
    return _loaded[key]


def read_frame(path: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file; opened per read, so threads share nothing and no descriptors pile up."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)


class TFRecordSource:
    """Records of several shards addressed by one global index; `decode` turns payload bytes into a record.

    `natoms` (N,) holds every record's atom count, from the index."""

    def __init__(self, paths: Sequence[str], decode: Callable[[bytes], dict]):
        if not paths:
            raise ValueError("TFRecordSource: no shard files given")
        self.paths = list(paths)
        self.decode = decode
        self.index = load_index(self.paths)
        self.natoms = self.index.natoms

    def __len__(self) -> int:
        return len(self.index.offsets)

    def __getitem__(self, i: int) -> dict:
        shard, record, start, end = self.index.locate(int(i))
        path = self.paths[shard]
        frame = read_frame(path, start, end)
        payload = frame[HEADER_BYTES:-FOOTER_BYTES]
        if zlib.crc32(frame) != self.index.crcs[i]:
            raise CorruptShardError(f"{path}: record {record}{_stored_source_id(payload, self.decode)} fails its "
                                    f"checksum (the shard is damaged; rebuild the split)")
        try:
            return self.decode(payload)
        except Exception as e:  # the decoder's own error types vary (protobuf, numpy)
            raise CorruptShardError(f"{path}: record {record} cannot be decoded: {e}") from e

