"""Random access into TFRecord shards through an offset index, so the pipeline can be resumed exactly.

TFRecord framing per record: uint64 length, uint32 masked CRC of the length, payload, uint32 masked CRC of
the payload. Scanning only the length headers indexes a shard without reading the payloads.
"""
from __future__ import annotations

import os
import struct
from typing import Callable, Sequence

import numpy as np

HEADER_BYTES = 12
FOOTER_BYTES = 4


class CorruptShardError(ValueError):
    """A shard whose framing or payload cannot be read."""


def index_shard(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Payload offsets and lengths (int64) of every record in one shard."""
    size = os.path.getsize(path)
    offsets, lengths = [], []
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
            offsets.append(pos + HEADER_BYTES)
            lengths.append(length)
            pos = end
            f.seek(pos)
    return np.asarray(offsets, np.int64), np.asarray(lengths, np.int64)


class TFRecordSource:
    """Records of several shards addressed by one global index; `decode` turns payload bytes into a record."""

    def __init__(self, paths: Sequence[str], decode: Callable[[bytes], dict]):
        if not paths:
            raise ValueError("TFRecordSource: no shard files given")
        self.paths = list(paths)
        self.decode = decode
        per_shard = [index_shard(p) for p in self.paths]
        self._shard = np.concatenate([np.full(len(o), i, np.int32) for i, (o, _) in enumerate(per_shard)])
        self._offset = np.concatenate([o for o, _ in per_shard])
        self._length = np.concatenate([n for _, n in per_shard])

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
            raise CorruptShardError(f"{path}: record {i} cannot be decoded: {e}") from e
