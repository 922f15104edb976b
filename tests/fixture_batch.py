"""Test utility: the GemNet-OC reference fixture (tests/fixtures/gemnet_oc_reference) as a padded
GraphBatch and Flax variables.

The batch is built from the reference's own batched graphs (`graphs.npz` `model.*`), so the model tests
do not depend on the graph builder. Every array gets exactly one padding slot: one padding structure
holding one padding atom, and one padding edge per edge set that joins the padding atom. The model takes
no triplet / quadruplet lists (it enumerates them over the edge slots; `test_slots.py` checks that these
are exactly the listed ones).
"""
from __future__ import annotations

import json

import jax.numpy as jnp
import jraph
import numpy as np

from fixture_files import reference_path
from jmp_jax.checkpoint import torch_pickle
from jmp_jax.checkpoint.names import state_dict_to_variables
from jmp_jax.graph.slots import slot_layouts
from jmp_jax.graph.types import EdgeSet, GraphBatch
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.jmp import variable_shapes

def load_config() -> BackboneConfig:
    return BackboneConfig.from_json(reference_path("config.json"))


def _pad(a: np.ndarray, value) -> np.ndarray:
    """Appends one entry filled with `value` along axis 0."""
    pad = np.full((1,) + a.shape[1:], value, dtype=a.dtype)
    return np.concatenate([a, pad], axis=0)


def _edge_set(g: dict, name: str, cells: np.ndarray, node_graph: np.ndarray, pad_node: int,
              float_dtype) -> EdgeSet:
    src, dst = g[f"model.{name}.edge_index"]
    shift = np.einsum("ei,eij->ej", g[f"model.{name}.cell_offset"].astype(np.float64), cells[node_graph[src]])
    return EdgeSet(senders=jnp.asarray(_pad(src, pad_node), jnp.int32),
                   receivers=jnp.asarray(_pad(dst, pad_node), jnp.int32),
                   shift=jnp.asarray(_pad(shift, 0.0), float_dtype),
                   mask=jnp.asarray(_pad(np.ones(len(src), bool), False)))


def load_batch(float_dtype=jnp.float32) -> GraphBatch:
    """inputs.npz + graphs.npz `model.*` -> GraphBatch with one padding slot per array.

    Positions are the float32-rounded inputs (what the reference model saw), cast to `float_dtype`.
    """
    inputs, g = dict(np.load(reference_path("inputs.npz"))), dict(np.load(reference_path("graphs.npz")))
    num_structures = len(inputs["natoms"])
    per = [{k: inputs[f"s{i}.{k}"] for k in ("atomic_numbers", "positions", "cell", "tags", "fixed")}
           for i in range(num_structures)]
    natoms = inputs["natoms"].astype(np.int64)
    num_atoms = int(natoms.sum())
    node_graph = np.repeat(np.arange(num_structures), natoms)
    cells = np.stack([p["cell"] for p in per])
    pos = np.concatenate([p["positions"] for p in per]).astype(np.float32).astype(np.float64)
    pad_node = num_atoms

    def cat(name, value):
        return _pad(np.concatenate([p[name] for p in per]), value)

    main = _edge_set(g, "main", cells, node_graph, pad_node, float_dtype)
    n_main = g["model.main.edge_index"].shape[1]
    graph = jraph.GraphsTuple(
        nodes={"atomic_numbers": jnp.asarray(cat("atomic_numbers", 0), jnp.int32),
               "positions": jnp.asarray(_pad(pos, 0.0), float_dtype),
               "tags": jnp.asarray(cat("tags", 0), jnp.int32),
               "fixed": jnp.asarray(cat("fixed", False)),
               "mask": jnp.asarray(_pad(np.ones(num_atoms, bool), False))},
        edges={"shift": main.shift, "mask": main.mask},
        senders=main.senders, receivers=main.receivers,
        n_node=jnp.asarray(_pad(natoms, 1), jnp.int32),
        n_edge=jnp.asarray(_pad(g["model.main.num_neighbors"], 1), jnp.int32),
        globals={"mask": jnp.asarray(_pad(np.ones(num_structures, bool), False))})
    others = {name: _edge_set(g, name, cells, node_graph, pad_node, float_dtype) for name in ("a2ee2a", "qint", "a2a")}
    edges = {name: (np.asarray(e.receivers), np.asarray(e.mask)) for name, e in {"main": main, **others}.items()}
    return GraphBatch(graph=graph, id_swap=jnp.asarray(_pad(g["model.id_swap"], n_main), jnp.int32), **others,
                      **slot_layouts(edges, num_atoms + 1))


def load_state_dict() -> dict[str, np.ndarray]:
    """The checkpoint's state dict (test_torch_pickle checks it against the reference's weights.npz digests)."""
    return dict(torch_pickle.load(reference_path("jmp_style_checkpoint.pt"))["state_dict"])


def load_variables(dtype=np.float32) -> dict:
    """The state dict -> Flax {'params', 'constants'} of JMPModel(config, num_tasks=1) via checkpoint.names."""
    return state_dict_to_variables(load_state_dict(), variable_shapes(load_config(), 1), dtype=dtype)


def load_outputs() -> dict[str, np.ndarray]:
    return dict(np.load(reference_path("outputs.npz")))


def load_stats() -> dict:
    with open(reference_path("stats.json")) as f:
        return json.load(f)
