"""Test utility: the GemNet-OC reference fixture as a padded GraphBatch and Flax variables.

The batch is built from the reference's own batched graphs and indices (`graphs.npz` `model.*`), so the
model tests do not depend on the graph builder. Every array gets exactly one padding slot: one padding
structure holding one padding atom, and one padding entry per edge set / index set that points at the
padding atom / edge / triplet.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
import jraph
import numpy as np

from jmp_jax.checkpoint.names import state_dict_to_variables
from jmp_jax.graph.slots import with_slots
from jmp_jax.graph.types import EdgeSet, GraphBatch, QuadrupletIndex, TripletIndex
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.jmp import variable_shapes

FIXTURE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "gemnet_oc_reference")


def fixture_path(name: str) -> str:
    return os.path.join(FIXTURE_DIR, name)


def fixture_available() -> bool:
    return all(os.path.exists(fixture_path(n)) for n in ("inputs.npz", "graphs.npz", "weights.npz",
                                                            "outputs.npz", "config.json"))


def load_config() -> BackboneConfig:
    return BackboneConfig.from_json(fixture_path("config.json"))


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


def _triplets(edge_in: np.ndarray, edge_out: np.ndarray, pad_in: int, pad_out: int) -> TripletIndex:
    return TripletIndex(edge_in=jnp.asarray(_pad(edge_in, pad_in), jnp.int32),
                        edge_out=jnp.asarray(_pad(edge_out, pad_out), jnp.int32),
                        mask=jnp.asarray(_pad(np.ones(len(edge_in), bool), False)))


def load_batch(float_dtype=jnp.float32) -> GraphBatch:
    """inputs.npz + graphs.npz `model.*` -> GraphBatch with one padding slot per array.

    Positions are the float32-rounded inputs (what the reference model saw), cast to `float_dtype`.
    """
    inputs, g = dict(np.load(fixture_path("inputs.npz"))), dict(np.load(fixture_path("graphs.npz")))
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
    n_a2ee2a = g["model.a2ee2a.edge_index"].shape[1]
    n_qint = g["model.qint.edge_index"].shape[1]
    n_trip_in, n_trip_out = len(g["model.quad.triplet_in.in"]), len(g["model.quad.triplet_out.in"])
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
    quad = QuadrupletIndex(
        triplet_in=_triplets(g["model.quad.triplet_in.in"], g["model.quad.triplet_in.out"], n_main, n_qint),
        triplet_out=_triplets(g["model.quad.triplet_out.in"], g["model.quad.triplet_out.out"], n_qint, n_main),
        edge_out=jnp.asarray(_pad(g["model.quad.out"], n_main), jnp.int32),
        trip_in_to_quad=jnp.asarray(_pad(g["model.quad.trip_in_to_quad"], n_trip_in), jnp.int32),
        trip_out_to_quad=jnp.asarray(_pad(g["model.quad.trip_out_to_quad"], n_trip_out), jnp.int32),
        mask=jnp.asarray(_pad(np.ones(len(g["model.quad.out"]), bool), False)))
    return with_slots(GraphBatch(
        graph=graph,
        id_swap=jnp.asarray(_pad(g["model.id_swap"], n_main), jnp.int32),
        a2ee2a=_edge_set(g, "a2ee2a", cells, node_graph, pad_node, float_dtype),
        qint=_edge_set(g, "qint", cells, node_graph, pad_node, float_dtype),
        a2a=_edge_set(g, "a2a", cells, node_graph, pad_node, float_dtype),
        trip_e2e=_triplets(g["model.trip_e2e.in"], g["model.trip_e2e.out"], n_main, n_main),
        trip_a2e=_triplets(g["model.trip_a2e.in"], g["model.trip_a2e.out"], n_a2ee2a, n_main),
        trip_e2a=_triplets(g["model.trip_e2a.in"], g["model.trip_e2a.out"], n_main, n_a2ee2a),
        quad=quad))


def load_state_dict() -> dict[str, np.ndarray]:
    return dict(np.load(fixture_path("weights.npz")))


def load_variables(dtype=np.float32) -> dict:
    """weights.npz -> Flax {'params', 'constants'} of JMPModel(config, num_tasks=1) via checkpoint.names."""
    return state_dict_to_variables(load_state_dict(), variable_shapes(load_config(), 1), dtype=dtype)


def load_outputs() -> dict[str, np.ndarray]:
    return dict(np.load(fixture_path("outputs.npz")))


def load_stats() -> dict:
    with open(fixture_path("stats.json")) as f:
        return json.load(f)
