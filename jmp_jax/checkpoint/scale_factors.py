"""Fitted GemNet-OC scale factors of JMP-S / JMP-L (the reference's scale_files small.pt / large.pt).

`jmp_scale_factors.json` (package data, generated from those files) maps set name -> {ScaleFactor module
path inside the backbone: value}; the torch state_dict key is `backbone.<path>.scale_factor`.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Mapping

import numpy as np

from jmp_jax.checkpoint import names

SCALE_SETS = {"jmp_s": "small", "jmp_l": "large"}
# Backbone parts that exist only with direct forces (JMP ignores them when loading a scalar model).
DIRECT_FORCE_PARTS = ("out_mlp_F", "seq_forces", "dense_rbf_F", "scale_rbf_F")


class ScaleFactorMismatchError(ValueError):
    """Scale factor names do not match the model's ScaleFactor modules."""


def load_scale_factors(name: str) -> dict[str, float]:
    """Fitted values for 'jmp_s' / 'jmp_l' (or the file names 'small' / 'large'): {module path: value}."""
    set_name = SCALE_SETS.get(name, name)
    with resources.files("jmp_jax.checkpoint").joinpath("jmp_scale_factors.json").open() as f:
        table = json.load(f)
    if set_name not in table:
        raise ScaleFactorMismatchError(f"unknown scale factor set {name!r}; known: {sorted(SCALE_SETS)}")
    return table[set_name]


def scale_factor_constants(values: Mapping[str, float], expected_constants: Mapping[str, Any]) -> dict:
    """{module path: value} -> the `constants` collection; every model ScaleFactor must get a value.

    `expected_constants`: the model's `constants` collection (values or `jax.eval_shape` shapes).
    """
    wanted = set(names.flatten_variables(expected_constants))
    tree: dict = {}
    problems = []
    for name, value in values.items():
        collection, path, _ = names.torch_to_flax(f"backbone.{name}.scale_factor")
        if collection != "constants" or path not in wanted:
            problems.append(f"unknown scale factor {name!r}")
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.asarray(value, np.float32)
        wanted.discard(path)
    problems += [f"no value for {names.flax_to_torch('constants', p)[0]}" for p in sorted(wanted)]
    if problems:
        raise ScaleFactorMismatchError("; ".join(problems))
    return tree


def is_direct_force_part(key: tuple) -> bool:
    """Whether a flattened variable path belongs to the direct-force branch (e.g. `seq_forces_1`)."""
    return any(str(part).startswith(DIRECT_FORCE_PARTS) for part in key)


def fitted_constants(name: str, expected_constants: Mapping[str, Any], direct_forces: bool = True) -> dict:
    """The `constants` collection with JMP's fitted values for 'jmp_s' / 'jmp_l'; a backbone without the
    direct-force branch takes the values of its other ScaleFactors."""
    values = {path: v for path, v in load_scale_factors(name).items()
              if direct_forces or not is_direct_force_part(tuple(path.split(".")))}
    return scale_factor_constants(values, expected_constants)
