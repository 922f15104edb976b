"""Checksums of orbax checkpoint steps: a manifest written once a save has completed, verified on restore.

`<root>/<step>/checksums.json` lists the size and sha256 of every file inside the step's item folders
(`params/...`, `metadata/metadata`, ...). Orbax itself checks nothing: a truncated or flipped byte only shows
as a tensorstore error naming no file, or not at all. Steps written before this manifest existed (or by a
process killed between orbax's commit and the manifest) have none and are read unverified.

Damaged steps are moved aside into `<root>/../damaged_checkpoints/`, never deleted: the manager's retention
then neither deletes nor trips over them, and the step number is free for a fresh save.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Iterable, Iterator, Mapping

import jax
import orbax.checkpoint as ocp

MANIFEST = "checksums.json"
FORMAT = "jmp_jax.checksums/1"
DAMAGED_DIR = "damaged_checkpoints"
_CHUNK = 1 << 22
_MAX_CAUSE = 1200  # characters of a library's error message quoted in ours: enough for two long file paths


class CheckpointDamagedError(ValueError):
    """A checkpoint step's files differ from what was saved, or orbax cannot read them."""


def step_dir(root: str | os.PathLike, step: int) -> str:
    return os.path.join(os.fspath(root), str(step))


def describe(step_path: str) -> str:
    """'checkpoint step 8 (/run/checkpoints/8)': how errors name a step."""
    return f"checkpoint step {os.path.basename(step_path)} ({step_path})"


@contextlib.contextmanager
def reading(step_path: str, what: str) -> Iterator[None]:
    """Turns whatever orbax / tensorstore raise while reading `what` of a step into one CheckpointDamagedError
    line naming the step (their own messages name neither the step nor the item)."""
    try:
        yield
    except CheckpointDamagedError:
        raise
    except Exception as err:
        raise CheckpointDamagedError(f"{describe(step_path)}: {what} cannot be read: {_cause(err)}") from err


def _cause(err: Exception) -> str:
    """The first line of an orbax / tensorstore error without the store spec that follows (kilobytes of JSON)."""
    lines = str(err).strip().splitlines()
    text = lines[0] if lines else ""
    for marker in (" [tensorstore_spec", " See full TensorStore details"):
        text = text.split(marker)[0]
    return f"{type(err).__name__}: {text if len(text) <= _MAX_CAUSE else text[:_MAX_CAUSE] + '...'}"


def restore_items(manager: ocp.CheckpointManager, step: int, args: Mapping[str, ocp.args.CheckpointArgs]) -> dict:
    """`manager.restore` of some items of a step; a missing item or a file orbax cannot read is a
    CheckpointDamagedError naming the step and the items (callers verify the files against the manifest first)."""
    path = step_dir(manager.directory, step)
    for item in args:
        if not os.path.isdir(os.path.join(path, item)):
            raise CheckpointDamagedError(f"{describe(path)}: item '{item}' is missing")
    with reading(path, ("items " if len(args) > 1 else "item ") + ", ".join(f"'{i}'" for i in args)):
        return manager.restore(step, args=ocp.args.Composite(**args))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _item_files(step_path: str) -> list[str]:
    """Paths relative to the step folder of every file inside its item folders, sorted."""
    files = []
    for item in sorted(os.listdir(step_path)):
        item_path = os.path.join(step_path, item)
        if not os.path.isdir(item_path):
            continue
        for folder, _, names in os.walk(item_path):
            files += [os.path.relpath(os.path.join(folder, n), step_path) for n in names]
    return sorted(files)


def write_manifest(step_path: str) -> str:
    """Writes `<step_path>/checksums.json` for the step's current files (call once the save has completed)."""
    paths = {rel: os.path.join(step_path, rel) for rel in _item_files(step_path)}
    files = {rel: {"size": os.path.getsize(path), "sha256": _sha256(path)} for rel, path in paths.items()}
    path = os.path.join(step_path, MANIFEST)
    with open(path + ".tmp", "w") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=0)
    os.replace(path + ".tmp", path)  # a reader sees the whole manifest or none
    return path


def has_manifest(step_path: str) -> bool:
    return os.path.isfile(os.path.join(step_path, MANIFEST))


def verify(step_path: str, items: Iterable[str] | None = None) -> bool:
    """Checks the files of `items` (default: all) against the manifest; False when the step has none.

    Raises CheckpointDamagedError naming the step, the item and the first file that is missing, has another
    size or another sha256.
    """
    if not has_manifest(step_path):
        return False
    try:
        with open(os.path.join(step_path, MANIFEST)) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointDamagedError(f"{describe(step_path)}: unreadable {MANIFEST}: {err}") from None
    wanted = None if items is None else set(items)
    for rel, expected in files.items():
        item, _, inner = rel.partition(os.sep)
        if wanted is not None and item not in wanted:
            continue
        if not os.path.isdir(os.path.join(step_path, item)):
            raise CheckpointDamagedError(f"{describe(step_path)}: item '{item}' is missing")
        where = f"{describe(step_path)}: item '{item}' file '{inner}'"
        path = os.path.join(step_path, rel)
        if not os.path.isfile(path):
            raise CheckpointDamagedError(f"{where} is missing")
        size = os.path.getsize(path)
        if size != expected["size"]:
            raise CheckpointDamagedError(f"{where} has {size} bytes, {expected['size']} were saved")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointDamagedError(f"{where} does not match its saved sha256")
    return True


def set_aside(step_path: str) -> str:
    """Moves a damaged step folder to `<root>/../damaged_checkpoints/<step>[.N]`; returns the new path."""
    root = os.path.dirname(step_path)
    target_dir = os.path.join(os.path.dirname(root), DAMAGED_DIR)
    os.makedirs(target_dir, exist_ok=True)
    name = os.path.basename(step_path)
    target, n = os.path.join(target_dir, name), 1
    while os.path.exists(target):
        target, n = os.path.join(target_dir, f"{name}.{n}"), n + 1
    os.rename(step_path, target)
    return target


class SealingCheckpointManager(ocp.CheckpointManager):
    """An orbax CheckpointManager that writes the manifest of every step it saved once orbax has finished it.

    Orbax waits for the previous save at the start of each save and on close, so sealing there keeps saves
    asynchronous; a step already removed by retention is skipped.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Orbax removes a killed save's temporary folders on a thread that neither close() nor exit joins: a run
        # failing in set-up (missing data) would exit under it and print its traceback. A listing: wait for it.
        self._maybe_await_cleanup_tmp_directory()
        self._unsealed: list[int] = []

    def save(self, step: int, *args, **kwargs) -> bool:
        saved = super().save(step, *args, **kwargs)
        if saved:
            self._unsealed.append(step)
        return saved

    def wait_until_finished(self) -> None:
        super().wait_until_finished()
        unsealed, self._unsealed = self._unsealed, []
        for step in unsealed:
            path = step_dir(self.directory, step)
            if jax.process_index() == 0 and os.path.isdir(path):
                write_manifest(path)
