"""Traced programs kept on disk, so that a restart skips jax's tracing as the persistent XLA cache skips
XLA's compile.

    step = program_store.jit(fn, name="gradient", key=(config_json, norm), in_shardings=..., donate_argnums=0)

The first call for an argument structure (tree, shapes, dtypes) traces `fn` and exports it (`jax.export`)
to `<directory>/<name>-<hash>.jaxexport`; later processes with the same key read the exported program
back (milliseconds, against 7-11 s of tracing for a JMP-S gradient on a CPU) and compile it, which the
persistent cache then answers. Every call, first or later, runs the exported program, so a run computes
the same whether or not it found a stored one.

What the key holds (any change traces again): the code (every file of the jmp_jax package, the Python
version and the versions of jax, jaxlib, flax, optax, e3nn-jax, jraph and numpy), the caller's `key`
(which must determine everything `fn` closes over: the run's configuration, data-derived constants such as
task normalisation, the mesh), jax's settings (all of `jax.config.values`, and the matrix-product precision
in effect), the backend and its devices, the argument tree, shapes, dtypes and the shardings. An unreadable
or corrupt file is reported in one line and traced again; a store never stops a run. `enable(None)` (the
default) is plain `jax.jit`.

Stored files are unpickled: they are trusted as the XLA cache beside them is (which holds machine code).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import pickle
import sys
import tempfile
from typing import Any, Callable, NamedTuple

import jax
from jax import export as jax_export

SUFFIX = ".jaxexport"
MAGIC = b"jmp_jax traced program 1\n"
KEEP_NEWEST = 256  # a JMP-S gradient is ~1.2 MB: a few hundred runs' shapes
DEPENDENCIES = ("jax", "jaxlib", "flax", "optax", "e3nn-jax", "jraph", "numpy")

_directory: str | None = None


def enable(directory: str | None) -> None:
    """Keeps traced programs in `directory` from now on in this process (None: off, plain jax.jit)."""
    global _directory
    _directory = directory


def directory() -> str | None:
    """Where `jit` keeps traced programs in this process; None when the store is off."""
    return _directory


@functools.cache
def code_fingerprint() -> str:
    """sha256 over the package's files and the versions of what traces it."""
    digest = hashlib.sha256(sys.version.encode())
    for dist in DEPENDENCIES:
        digest.update(f"{dist}=={importlib.metadata.version(dist)}\n".encode())
    root = os.path.dirname(os.path.abspath(__file__))
    for folder, dirs, files in sorted(os.walk(root)):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(f for f in files if f.endswith((".py", ".json"))):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def broadcast_prefix(prefix: Any, tree: Any) -> list:
    """One entry of `prefix` (a jit-style sharding prefix of `tree`; None: replicated) per leaf of `tree`."""
    per_leaf = jax.tree.map(lambda p, sub: [p] * len(jax.tree.leaves(sub)), prefix, tree,
                            is_leaf=lambda x: x is None)
    return [p for group in jax.tree.leaves(per_leaf, is_leaf=lambda x: isinstance(x, list)) for p in group]


class _Program(NamedTuple):
    run: Callable          # jitted exported program: flat leaves in, flat leaves out
    out_treedef: Any       # None: `run` is jax.jit of the function itself (it could not be exported)


class StoredJit:
    """`jax.jit(fn, **jit_options)` whose traced programs are kept in a store directory (module docstring).
    Arguments are positional. jit_options: in_shardings, out_shardings (jit-style prefixes; not given:
    unspecified, as in jax.jit) and donate_argnums."""

    def __init__(self, fn: Callable, *, name: str, key: Any, directory: str, **jit_options):
        unknown = set(jit_options) - {"in_shardings", "out_shardings", "donate_argnums"}
        if unknown:
            raise TypeError(f"program_store.jit does not take {sorted(unknown)}")
        self.fn, self.name, self.key, self.directory = fn, name, key, directory
        self.jit_options = jit_options
        donate = jit_options.get("donate_argnums", ())
        self.donate_argnums = (donate,) if isinstance(donate, int) else tuple(donate)
        self._programs: dict[Any, _Program] = {}

    def __call__(self, *args):
        program, leaves = self._program_for(args)
        if program.out_treedef is None:  # not exportable: plain jax.jit of `fn`
            return program.run(*args)
        return jax.tree.unflatten(program.out_treedef, program.run(*leaves))

    def lower(self, *args) -> jax.stages.Lowered:
        """The program for these arguments (arrays or jax.ShapeDtypeStruct), read back or traced and stored,
        lowered as `jax.jit(...).lower` does; `.compile()` it to time or inspect the compile."""
        program, leaves = self._program_for(args)
        return program.run.lower(*(args if program.out_treedef is None else leaves))

    def _program_for(self, args: tuple) -> tuple[_Program, list]:
        leaves, treedef = jax.tree.flatten(args)
        signature = (treedef, tuple(jax.typeof(x) for x in leaves))
        program = self._programs.get(signature)
        if program is None:
            program = self._programs[signature] = self._program(args, leaves, treedef)
        return program, leaves

    def _program(self, args: tuple, leaves: list, treedef) -> _Program:
        options = self.jit_options
        in_shardings = tuple(broadcast_prefix(options["in_shardings"], args)) if "in_shardings" in options else None
        first_leaf = [len(jax.tree.leaves(args[:i])) for i in range(len(args) + 1)]
        donated = tuple(j for i in self.donate_argnums for j in range(first_leaf[i], first_leaf[i + 1]))
        # jax's settings: every global one (x64, PRNG implementation, ...) and the matrix-product precision,
        # which is also set in context (jax.default_matmul_precision).
        settings = (sorted(jax.config.values.items()), jax.config.jax_default_matmul_precision)
        description = repr((code_fingerprint(), self.name, self.key, settings, jax.default_backend(), jax.devices(),
                            jax.process_count(), treedef, [jax.typeof(x) for x in leaves], in_shardings,
                            options.get("out_shardings"), donated))
        path = os.path.join(self.directory, f"{self.name}-{hashlib.sha256(description.encode()).hexdigest()[:32]}"
                                            f"{SUFFIX}")
        stored = read(path, description)
        if stored is None:
            try:
                stored = export_flat(self.fn, treedef, leaves, in_shardings=in_shardings)
            except Exception as err:  # noqa: BLE001 - e.g. a host callback jax.export cannot serialize
                # Plain jax.jit instead; an error of `fn` itself is raised again by it, as jax.jit would.
                print(f"warning: {self.name} not stored ({_one_line(err)}); running it with jax.jit",
                      file=sys.stderr)
                return _Program(jax.jit(self.fn, **options), None)
            write(path, description, *stored)
        exported, out_treedef = stored
        flat_options: dict[str, Any] = {"donate_argnums": donated}
        if in_shardings is not None:
            flat_options["in_shardings"] = in_shardings
        if "out_shardings" in options:
            outputs = jax.tree.unflatten(out_treedef, [0] * out_treedef.num_leaves)
            # A list: the exported program returns its outputs as one.
            flat_options["out_shardings"] = broadcast_prefix(options["out_shardings"], outputs)
        return _Program(jax.jit(exported.call, **flat_options), out_treedef)


def export_flat(fn: Callable, treedef, leaves: list, *, in_shardings: tuple | None = None,
                platforms: tuple[str, ...] | None = None) -> tuple[jax_export.Exported, Any]:
    """(exported program, output tree) of `fn` on the arguments `jax.tree.unflatten(treedef, leaves)` (arrays
    or jax.ShapeDtypeStruct), taking and returning flat leaves: custom pytree nodes (train states, optimiser
    states) then need no serialization of their own. platforms: those to lower for (default: this backend).
    """
    out_treedefs = []

    def flat_fn(*flat_args):
        out_leaves, out_treedef = jax.tree.flatten(fn(*jax.tree.unflatten(treedef, flat_args)))
        out_treedefs.append(out_treedef)
        return out_leaves

    abstract = [jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=jax.typeof(x).weak_type) for x in leaves]
    options = {} if in_shardings is None else {"in_shardings": in_shardings}
    exported = jax_export.export(jax.jit(flat_fn, **options), platforms=platforms)(*abstract)
    return exported, out_treedefs[-1]


def read(path: str, description: str) -> tuple[jax_export.Exported, Any] | None:
    """(exported program, output tree) stored at `path` for `description`, or None (missing, or unusable:
    reported in one line)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, NotADirectoryError):  # not stored yet (the write reports an unusable folder)
        return None
    except OSError as err:
        return _unusable(path, err.strerror)
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 32:
        return _unusable(path, "not a jmp_jax traced program")
    checksum, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if hashlib.sha256(payload).digest() != checksum:
        return _unusable(path, "checksum mismatch (corrupt or truncated)")
    try:
        stored_description, serialized, out_treedef = pickle.loads(payload)
        if stored_description != description:
            return _unusable(path, "stored for another key")
        exported = jax_export.deserialize(bytearray(serialized))
    except Exception as err:  # noqa: BLE001 - any failure to read back means: trace again
        return _unusable(path, _one_line(err))
    with contextlib.suppress(OSError):  # newest use, for eviction; a read-only store is still read
        os.utime(path)
    return exported, out_treedef


def write(path: str, description: str, exported: jax_export.Exported, out_treedef) -> None:
    """Stores a program atomically (a reader sees the old file or the whole new one) and keeps the
    directory to its KEEP_NEWEST most recently used files; a failure is reported, never raised."""
    payload = pickle.dumps((description, bytes(exported.serialize()), out_treedef))
    directory = os.path.dirname(path)
    temporary = None
    try:
        os.makedirs(directory, exist_ok=True)
        # A unique temporary name: the processes of a run (on hosts sharing the folder) store the same program.
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path), suffix=".tmp")
        with os.fdopen(handle, "wb") as f:
            f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
        os.replace(temporary, path)
    except OSError as err:
        print(f"warning: traced program not stored: {path}: {err.strerror}", file=sys.stderr)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.remove(temporary)
        return
    _evict(directory)


def _evict(directory: str) -> None:
    """Removes all but the KEEP_NEWEST most recently used programs (other processes may be doing the same)."""
    stored = []
    for entry in os.scandir(directory):
        with contextlib.suppress(OSError):
            if entry.name.endswith(SUFFIX):
                stored.append((entry.stat().st_mtime, entry.path))
    for _, old in sorted(stored)[:-KEEP_NEWEST]:
        with contextlib.suppress(OSError):
            os.remove(old)


def _one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0]


def _unusable(path: str, reason: str) -> None:
    print(f"warning: traced program store: ignoring {path}: {reason}; tracing again", file=sys.stderr)
    return None


def jit(fn: Callable, *, name: str, key: Any, **jit_options) -> Callable:
    """A `StoredJit` in the enabled directory, or `jax.jit(fn, **jit_options)` when the store is off."""
    if _directory is None:
        return jax.jit(fn, **jit_options)
    return StoredJit(fn, name=name, key=key, directory=_directory, **jit_options)
