"""PyTorch (JMP `PretrainModel` state_dict) <-> Flax variable names, and state_dict -> Flax variables.

Rules (docs/jmp_spec.md §5):
- torch key components are separated by '.'; a numeric ModuleList/Sequential index i following
  component `name` becomes the Flax module `name_{i}`;
- GemNet `Dense` `X.linear.weight` (out, in) -> params `X/kernel` (in, out), transposed;
- `BasisEmbedding` `X.weight` -> params `X/weight`, torch layout kept;
- `X.scale_factor` (scalar buffer) -> constants `X/scale_factor`;
- `embedding.atom_embedding.weight` -> params `embedding/atom_embedding/embedding`;
- heads `output.out_{energy,forces}.{t}.{j}.weight|bias` (nn.Linear at even Sequential slots) ->
  params `output/out_{energy,forces}_{t}/linear_{j//2}/kernel (transposed)|bias`;
- dropped: gaussian buffers `rbf.offset|temps` (recomputed), the `seq_energy_pre` alias of `layers`,
  Lightning's `task_steps.*` metric state.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from jmp_jax.models.bases import gaussian_offsets, gaussian_temps

Path = tuple[str, ...]
IDENTITY, TRANSPOSE = "identity", "transpose"
_HEAD = re.compile(r"^output\.(out_energy|out_forces)\.(\d+)\.(\d+)\.(weight|bias)$")
_NUMBERED = re.compile(r"^(.*)_(\d+)$")


class CheckpointMismatchError(ValueError):
    """A checkpoint (a torch state_dict, or an orbax checkpoint's metadata / variable trees) does not match the
    model or variable tree it is loaded into; the message lists the unknown, missing and mis-shaped keys."""


def dropped_reason(key: str) -> str | None:
    """Why a torch key has no Flax counterpart, or None if it has one."""
    parts = key.split(".")
    if parts[0] == "task_steps":
        return "Lightning metric state"
    if parts[-2:] in (["rbf", "offset"], ["rbf", "temps"]):
        return "gaussian basis buffer (recomputed)"
    if "seq_energy_pre" in parts:
        return "alias of out_blocks.*.layers"
    return None


def _merge_indices(parts: list[str], key: str) -> Path:
    """['int_blocks', '0', 'dense_ca'] -> ('int_blocks_0', 'dense_ca')."""
    out: list[str] = []
    for part in parts:
        if part.isdigit():
            if not out:
                raise CheckpointMismatchError(f"torch key {key!r} starts with an index")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def torch_to_flax(key: str) -> tuple[str, Path, str]:
    """torch key -> (collection, Flax path, transform); raises CheckpointMismatchError if unmappable."""
    if dropped_reason(key):
        raise CheckpointMismatchError(f"torch key {key!r} is dropped ({dropped_reason(key)})")
    if key == "embedding.atom_embedding.weight":
        return "params", ("embedding", "atom_embedding", "embedding"), IDENTITY
    head = _HEAD.match(key)
    if head:
        kind, task, slot, leaf = head.groups()
        if int(slot) % 2:
            raise CheckpointMismatchError(f"torch key {key!r}: odd Sequential slots are activations")
        path = ("output", f"{kind}_{task}", f"linear_{int(slot) // 2}")
        return ("params", path + ("kernel",), TRANSPOSE) if leaf == "weight" else ("params", path + ("bias",), IDENTITY)
    parts = key.split(".")
    if parts[0] != "backbone" or len(parts) < 3:
        raise CheckpointMismatchError(f"unknown torch key {key!r}")
    body = parts[1:]
    if body[-1] == "scale_factor":
        return "constants", ("backbone",) + _merge_indices(body[:-1], key) + ("scale_factor",), IDENTITY
    if body[-2:] == ["linear", "weight"]:
        return "params", ("backbone",) + _merge_indices(body[:-2], key) + ("kernel",), TRANSPOSE
    if body[-1] == "weight":
        return "params", ("backbone",) + _merge_indices(body[:-1], key) + ("weight",), IDENTITY
    raise CheckpointMismatchError(f"unknown torch key {key!r}")


def _split_index(name: str) -> list[str]:
    match = _NUMBERED.match(name)
    return [match.group(1), match.group(2)] if match else [name]


def flax_to_torch(collection: str, path: Path) -> tuple[str, str]:
    """(collection, Flax path) -> (torch key, transform); inverse of `torch_to_flax`."""
    if collection == "params" and path == ("embedding", "atom_embedding", "embedding"):
        return "embedding.atom_embedding.weight", IDENTITY
    if collection == "params" and path[0] == "output" and len(path) == 4:
        kind, task = _split_index(path[1])
        _, layer = _split_index(path[2])
        leaf = "weight" if path[3] == "kernel" else "bias"
        key = f"output.{kind}.{task}.{2 * int(layer)}.{leaf}"
        return key, TRANSPOSE if leaf == "weight" else IDENTITY
    if path[0] != "backbone":
        raise CheckpointMismatchError(f"unknown Flax path {collection}/{'/'.join(path)}")
    body = [piece for name in path[1:-1] for piece in _split_index(name)]
    leaf = path[-1]
    if collection == "constants" and leaf == "scale_factor":
        return ".".join(["backbone", *body, "scale_factor"]), IDENTITY
    if collection == "params" and leaf == "kernel":
        return ".".join(["backbone", *body, "linear", "weight"]), TRANSPOSE
    if collection == "params" and leaf == "weight":
        return ".".join(["backbone", *body, "weight"]), IDENTITY
    raise CheckpointMismatchError(f"unknown Flax path {collection}/{'/'.join(path)}")


def flatten_variables(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """Nested dict -> {path tuple: leaf}."""
    flat: dict[Path, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(flatten_variables(value, prefix + (name,)))
        else:
            flat[prefix + (name,)] = value
    return flat


def _insert(tree: dict, path: Path, value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _check_dropped(key: str, value: np.ndarray, state_dict: Mapping[str, np.ndarray]) -> str | None:
    """Error message if a dropped buffer/alias disagrees with what the Flax model assumes, else None."""
    if key.endswith("rbf.offset") or key.endswith("rbf.temps"):
        expected = (gaussian_offsets if key.endswith("offset") else gaussian_temps)(value.shape[0])
        if not np.allclose(value, expected, rtol=1e-6, atol=1e-7):
            return f"{key}: buffer differs from the recomputed gaussian basis"
    elif "seq_energy_pre" in key.split("."):
        original = key.replace("seq_energy_pre", "layers")
        if original not in state_dict or not np.array_equal(state_dict[original], value):
            return f"{key}: alias differs from {original}"
    return None


def state_dict_to_variables(state_dict: Mapping[str, Any], expected: Mapping[str, Any],
                            dtype: Any = np.float32) -> dict[str, dict]:
    """Flat {torch key: array} -> Flax variables {'params': ..., 'constants': ...}.

    `expected`: the model's variables or their shapes (e.g. `jax.eval_shape` of `init`), with at least
    the 'params' and 'constants' collections. Raises CheckpointMismatchError listing every unknown,
    missing or mis-shaped key and every inconsistent dropped buffer.
    """
    wanted = {(col, path): leaf.shape for col in ("params", "constants") if col in expected
              for path, leaf in flatten_variables(expected[col]).items()}
    variables: dict[str, dict] = {col: {} for col in ("params", "constants") if col in expected}
    problems: list[str] = []
    seen: set[tuple[str, Path]] = set()
    for key, value in state_dict.items():
        value = np.asarray(value)
        if dropped_reason(key):
            problem = _check_dropped(key, value, state_dict)
            problems += [problem] if problem else []
            continue
        try:
            collection, path, transform = torch_to_flax(key)
        except CheckpointMismatchError as err:
            problems.append(f"unknown: {err}")
            continue
        if (collection, path) not in wanted:
            problems.append(f"unknown: {key} -> {collection}/{'/'.join(path)} is not in the model")
            continue
        array = value.T if transform == TRANSPOSE else value
        if tuple(array.shape) != tuple(wanted[(collection, path)]):
            problems.append(f"shape: {key} {tuple(value.shape)} -> {collection}/{'/'.join(path)} "
                            f"expects {tuple(wanted[(collection, path)])} after {transform}")
            continue
        _insert(variables[collection], path, np.array(array, dtype=dtype, order="C"))
        seen.add((collection, path))
    for collection, path in sorted(set(wanted) - seen):
        problems.append(f"missing: {flax_to_torch(collection, path)[0]} ({collection}/{'/'.join(path)})")
    if problems:
        raise CheckpointMismatchError(f"{len(problems)} state_dict problem(s):\n  " + "\n  ".join(problems))
    return variables
