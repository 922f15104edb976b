"""Reads `torch.save` zip checkpoints with numpy only: no torch, no `jmp`, no arbitrary code.

A torch zip checkpoint holds `<prefix>/data.pkl` (a pickle whose tensors point at storages through
persistent ids), `<prefix>/data/<key>` (raw little-endian storage bytes) and `<prefix>/byteorder`.
The unpickler below resolves storages to numpy buffers, rebuilds tensors as numpy arrays, builds the
standard containers, and replaces every other class (Lightning, pathlib, `jmp.*` configs, ...) with an
inert `StandIn` that only records its name, arguments and state.
"""
from __future__ import annotations

import codecs
import collections
import mmap
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any

import ml_dtypes
import numpy as np


class TorchCheckpointError(ValueError):
    """The file is not a readable torch zip checkpoint (or asks for something this reader refuses)."""


# Legacy typed-storage class name (as pickled by torch.save) -> element dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexDoubleStorage": np.dtype(np.complex128),
    "ComplexFloatStorage": np.dtype(np.complex64),
    # Dtypes without a legacy class are saved as raw bytes; `_rebuild_tensor_v3` names the dtype.
    "UntypedStorage": np.dtype(np.uint8),
}

# `torch.<dtype>` globals (arguments of `_rebuild_tensor_v3`) -> numpy dtype.
_TORCH_DTYPES = {
    "float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
    "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64, "bool": np.bool_,
    "complex64": np.complex64, "complex128": np.complex128,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
}


class StandIn:
    """Inert replacement for a class the reader does not trust.

    Calling the stand-in class (pickle REDUCE/NEWOBJ) makes an instance that keeps the call `args`;
    pickle BUILD stores the object's `state`. Nothing of the original class is ever executed.
    """

    module = "?"
    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        # __new__ (not __init__): pickle's NEWOBJ calls only __new__, REDUCE calls the class.
        obj = super().__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def fields(self) -> dict[str, Any]:
        """The object's attribute dict as pickled (pydantic `__dict__`, plain `__dict__`, or slots)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__ or None, slots dict)
            merged = dict(state[0] or {})
            merged.update(state[1] or {})
            state = merged
        if isinstance(state, dict):
            inner = state.get("__dict__")
            return dict(inner) if isinstance(inner, dict) else dict(state)
        return {}

    def __getattr__(self, name: str) -> Any:
        # Only called when ordinary lookup fails: expose pickled fields as attributes.
        if name.startswith("__") or name in ("args", "kwargs", "state"):
            raise AttributeError(name)
        fields = self.fields
        if name in fields:
            return fields[name]
        raise AttributeError(f"{self.module}.{self.qualname} stand-in has no field {name!r}")

    def __repr__(self) -> str:
        return f"StandIn({self.module}.{self.qualname})"


def _stand_in_class(module: str, name: str) -> type[StandIn]:
    return type(name.rsplit(".", 1)[-1], (StandIn,), {"module": module, "qualname": name})


def to_plain(obj: Any) -> Any:
    """Recursively turns stand-ins into `{field: value}` dicts (for config inspection / JSON)."""
    if isinstance(obj, StandIn):
        return {k: to_plain(v) for k, v in obj.fields.items()}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(to_plain(v) for v in obj)
    return obj


class _StorageType:
    """What `torch.FloatStorage` & co. unpickle to: a marker carrying the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A 1-D numpy buffer standing for one torch storage (shared by every tensor that views it)."""

    def __init__(self, data: np.ndarray):
        self.data = data


def _tensor_from_storage(storage: Any, offset: int, size: Any, stride: Any,
                         dtype: np.dtype | None = None) -> np.ndarray:
    """A numpy array viewing `storage` like torch's `set_(storage, offset, size, stride)` does.

    offset/stride count elements of the tensor dtype. Dense row-major tensors come back as read-only
    views of the (memory-mapped) storage; anything else is copied so no overlapping view escapes.
    """
    if not isinstance(storage, _Storage):
        raise TorchCheckpointError(f"tensor rebuilt from {type(storage).__name__}, not from a storage")
    buf = storage.data if dtype is None else storage.data.view(np.uint8).view(dtype)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or min(stride, default=0) < 0 or int(offset) < 0:
        raise TorchCheckpointError(f"bad tensor geometry: size {size}, stride {stride}, offset {offset}")
    if 0 in size:
        return np.empty(size, dtype=buf.dtype)
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= buf.size:
        raise TorchCheckpointError(
            f"tensor (size {size}, stride {stride}, offset {offset}) overruns its storage of {buf.size} elements")
    itemsize = buf.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        buf[int(offset):], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
    return view if view.flags.c_contiguous else view.copy()


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    array = _tensor_from_storage(storage, storage_offset, size, stride)
    return _apply_metadata(array, metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None):
    if not isinstance(dtype, np.dtype):
        raise TorchCheckpointError(f"unsupported tensor dtype {dtype!r}")
    return _apply_metadata(_tensor_from_storage(storage, storage_offset, size, stride, dtype), metadata)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor_from_storage(storage, storage_offset, size, stride)


def _apply_metadata(array: np.ndarray, metadata: Any) -> np.ndarray:
    """Applies torch's lazy conj/neg bits (a tensor with the neg bit means -stored values)."""
    if metadata and metadata.get("conj"):
        array = np.conj(array)
    if metadata and metadata.get("neg"):
        array = np.negative(array)
    return array


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _bytes_from_latin1(text: Any, encoding: Any = "latin1") -> bytes:
    # Protocol-2 pickles spell `bytes` as `_codecs.encode(str, "latin1")`; allow nothing else.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise TorchCheckpointError(f"refused _codecs.encode({type(text).__name__}, {encoding!r})")
    return codecs.encode(text, "latin1")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("_codecs", "encode"): _bytes_from_latin1,
    **{("builtins", t.__name__): t for t in (dict, list, tuple, set, frozenset, int, float, complex, bool,
                                             str, bytes, slice)},
}


def _local_header_size(raw: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Byte length of a zip member's local header (the data follows it)."""
    header = raw[info.header_offset:info.header_offset + 30]
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise TorchCheckpointError(f"bad local zip header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return 30 + name_len + extra_len


class _Unpickler(pickle.Unpickler):
    def __init__(self, data_file, archive: zipfile.ZipFile, raw: mmap.mmap | None, prefix: str, swap: bool):
        super().__init__(data_file)
        self._archive, self._raw, self._prefix, self._swap = archive, raw, prefix, swap
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        if (module, name) == ("copyreg", "_reconstructor"):
            return _reconstruct_stand_in
        return _stand_in_class(module, name)

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchCheckpointError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise TorchCheckpointError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(self._read_storage(str(key), storage_type.dtype, int(numel)))
        return self._storages[key]

    def _read_storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        name = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(name)
        except KeyError:
            raise TorchCheckpointError(f"storage {name} is missing from the archive") from None
        nbytes = numel * dtype.itemsize
        if info.file_size < nbytes:
            raise TorchCheckpointError(f"storage {name} holds {info.file_size} bytes, expected {nbytes}")
        file_dtype = dtype.newbyteorder(">") if self._swap else dtype
        if self._raw is not None and info.compress_type == zipfile.ZIP_STORED:
            # torch stores members uncompressed: map them instead of reading (optimizer states can be GBs).
            start = info.header_offset + _local_header_size(self._raw, info)
            if start + info.file_size > len(self._raw):
                raise TorchCheckpointError(f"storage {name} runs past the end of the file")
            with memoryview(self._raw)[start:start + info.file_size] as member:
                crc = zlib.crc32(member)
            if crc != info.CRC:
                raise TorchCheckpointError(f"storage {name} fails its zip CRC-32 check (stored {info.CRC:08x}, "
                                           f"computed {crc:08x}): the file is damaged")
            data = np.frombuffer(self._raw, dtype=file_dtype, count=numel, offset=start)
        else:
            data = np.frombuffer(self._archive.read(name)[:nbytes], dtype=file_dtype)  # read() checks the CRC
        return data.astype(dtype) if self._swap else data


def _reconstruct_stand_in(cls: Any, base: Any, state: Any) -> Any:
    # Protocol 0/1 objects: copyreg._reconstructor(cls, object, None); only stand-in classes pass.
    if isinstance(cls, type) and issubclass(cls, StandIn):
        return cls()
    raise TorchCheckpointError(f"refused copyreg._reconstructor({cls!r})")


def load(path: str | os.PathLike) -> Any:
    """Unpickles a torch zip checkpoint into plain Python containers with numpy arrays for tensors.

    Raises TorchCheckpointError (a ValueError) naming `path` when the file is not a readable checkpoint.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else None
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pickles) != 1:
                raise TorchCheckpointError(f"expected one data.pkl in the archive, found {pickles}")
            prefix = pickles[0][: -len("data.pkl")]
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            swap = byteorder != "little"
            with archive.open(pickles[0]) as data_file:
                return _Unpickler(data_file, archive, raw, prefix, swap).load()
    except TorchCheckpointError as e:
        raise TorchCheckpointError(f"{path}: {e}") from None
    except zipfile.BadZipFile as e:
        raise TorchCheckpointError(
            f"{path} is not a torch zip checkpoint (corrupt, truncated, or saved in torch's legacy format): {e}"
        ) from None
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, KeyError, ValueError,
            struct.error, zlib.error) as e:
        raise TorchCheckpointError(f"{path}: unreadable checkpoint pickle ({type(e).__name__}: {e})") from None
