"""JMP pre-training model: atom embedding + GemNet-OC backbone + per-task energy/force heads (docs/jmp_spec.md §1.7).

Param tree (mirrors the PyTorch `PretrainModel` state_dict, see `jmp_jax.checkpoint.names`):
  embedding/atom_embedding/embedding (120, A)
  backbone/...                                   GemNet-OC backbone
  output/out_energy_{t}/linear_{j}/{kernel,bias} torch `output.out_energy.{t}.{2j}`
  output/out_forces_{t}/linear_{j}/{kernel,bias}
and the fitted scale factors in the `constants` collection at `backbone/.../scale_*/scale_factor`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from jmp_jax.graph.types import EdgeSet, EdgeSlots, GraphBatch
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.gemnet import BlockExecution, GemNetOCBackbone
from jmp_jax.models.kernels import dense_dot_general
from jmp_jax.models.layers import scaled_silu

HEAD_NUM_HIDDEN = 4  # JMP's mlp([d] * 5 + [1]): 4 hidden Linear(d, d) layers, then Linear(d, 1)


def torch_linear_bias_init(fan_in: int):
    """PyTorch's default nn.Linear bias init, uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# PyTorch's default nn.Linear weight init (kaiming_uniform, a=sqrt(5)) = uniform(+-1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class HeadMLP(nn.Module):
    """(..., d) -> (..., features): `num_hidden` x (Linear(d, d) + ScaledSiLU), then Linear(d, features).

    The output MLP of every head, pre-training's and fine-tuning's (JMP's `mlp([d] * (num_hidden + 1) +
    [features])`). hidden_bias: bias on the hidden layers; the last layer has one only with `final_bias`
    (JMP's `no_bias_scalar`: never for a single output). Params `linear_{j}/{kernel,bias}`, torch init.
    """

    features: int = 1
    num_hidden: int = HEAD_NUM_HIDDEN
    hidden_bias: bool = True
    final_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]

        def linear(features: int, bias: bool, name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=bias, dtype=self.dtype, param_dtype=jnp.float32,
                            kernel_init=torch_linear_kernel_init, bias_init=torch_linear_bias_init(width),
                            dot_general=dense_dot_general, name=name)

        for j in range(self.num_hidden):
            x = scaled_silu(linear(width, self.hidden_bias, f"linear_{j}")(x))
        x = linear(self.features, self.final_bias, f"linear_{self.num_hidden}")(x)
        return x.astype(jnp.promote_types(self.dtype, jnp.float32))


class PretrainOutput(nn.Module):
    """Per-task heads (`output/...`): energy summed per structure, forces F_t = sum_{s->t} f_st V_st.

    `task`: a static int (every structure's head), or a (G,) int array (each structure's own head, for
    mixed-task batches: every head runs on every atom and edge, as JMP's taskified outputs do, and each
    atom and edge keeps its structure's).
    """

    num_tasks: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, energy_features: jax.Array, force_features: jax.Array, V_st: jax.Array,
                 batch: GraphBatch, task: int | jax.Array) -> tuple[jax.Array, jax.Array]:
        per_structure = jnp.ndim(task) == 1
        # Only the requested task's heads run, except at init or per structure, which need every task's.
        tasks = range(self.num_tasks) if self.is_initializing() or per_structure else (task,)
        heads = {t: (HeadMLP(dtype=self.dtype, name=f"out_energy_{t}")(energy_features)[..., 0],   # (N,)
                     HeadMLP(dtype=self.dtype, name=f"out_forces_{t}")(force_features)[..., 0])    # (E,)
                 for t in tasks}
        if per_structure:
            node_task = task[batch.node_graph_index]
            e_atom = jnp.stack([heads[t][0] for t in tasks], -1)[jnp.arange(node_task.shape[0]), node_task]
            edge_task = node_task[batch.graph.receivers]
            f_edge = jnp.stack([heads[t][1] for t in tasks], -1)[jnp.arange(edge_task.shape[0]), edge_task]
        else:
            e_atom, f_edge = heads[task]
        energy = jax.ops.segment_sum(e_atom, batch.node_graph_index, num_segments=batch.num_graphs)
        forces = jax.ops.segment_sum(f_edge[:, None] * V_st.astype(f_edge.dtype), batch.graph.receivers,
                                     num_segments=batch.num_nodes)
        return energy, forces


class JMPModel(nn.Module):
    """JMP pre-training model.

    __call__(batch, task) -> {"energy": (G,), "forces": (N, 3), "energy_features": (N, A),
    "force_features": (E, E_dim), "V_st": (E, 3), "D_st": (E,)}; padding structures/atoms give 0.
    `task` is a static Python int, or a (G,) int array of each structure's task (mixed-task batches);
    `train` (static) enables the edge-dropout compensation. `dtype` is the compute dtype (params, geometry,
    bases stay float32). `execution`: how the backbone runs its blocks (scanned by default, optional remat).
    Sows `h_embedding` and the backbone's per-layer intermediates into `intermediates`.
    """

    config: BackboneConfig
    num_tasks: int
    dtype: Any = jnp.float32
    execution: BlockExecution = BlockExecution()

    @nn.compact
    def __call__(self, batch: GraphBatch, task: int | jax.Array = 0, train: bool = False) -> dict[str, jax.Array]:
        if jnp.ndim(task) == 0 and not 0 <= task < self.num_tasks:
            raise ValueError(f"task {task} out of range for a model with {self.num_tasks} tasks")
        if not self.config.direct_forces:
            raise ValueError("the pre-training model needs the direct-force branch (config.direct_forces=True)")
        h = AtomEmbedding(self.config.num_elements, self.config.emb_size_atom, name="embedding")(
            batch.graph.nodes["atomic_numbers"])
        self.sow("intermediates", "h_embedding", h)
        out = GemNetOCBackbone(self.config, self.dtype, self.execution, name="backbone")(h, batch, train)
        energy, forces = PretrainOutput(self.num_tasks, self.dtype, name="output")(
            out.energy_features, out.force_features, out.V_st, batch, task)
        node_mask = batch.graph.nodes["mask"]
        return {
            "energy": jnp.where(batch.graph.globals["mask"], energy, 0.0),
            "forces": jnp.where(node_mask[:, None], forces, 0.0),
            "energy_features": out.energy_features,
            "force_features": out.force_features,
            "V_st": out.V_st,
            "D_st": out.D_st,
        }


class AtomEmbedding(nn.Module):
    """Embedding of atomic number Z at row Z-1 (`embedding/atom_embedding/embedding`), N(0, 1) init."""

    num_elements: int
    features: int

    @nn.compact
    def __call__(self, atomic_numbers: jax.Array) -> jax.Array:
        # Padding atoms have Z = 0: clamp so the lookup stays in range (they only reach padding segments).
        index = jnp.maximum(atomic_numbers - 1, 0)
        return nn.Embed(self.num_elements, self.features, embedding_init=nn.initializers.normal(1.0),
                        name="atom_embedding")(index)


def placeholder_batch(num_nodes: int = 2, num_edges: int = 2) -> GraphBatch:
    """A tiny all-padding GraphBatch (1 graph) for `init` / `jax.eval_shape`; shapes only matter."""
    zeros_i = jnp.zeros((num_edges,), jnp.int32)
    mask = jnp.zeros((num_edges,), bool)
    edge_set = EdgeSet(zeros_i, zeros_i, jnp.zeros((num_edges, 3), jnp.float32), mask)
    graph = jraph.GraphsTuple(
        nodes={"atomic_numbers": jnp.ones((num_nodes,), jnp.int32), "positions": jnp.zeros((num_nodes, 3)),
               "tags": jnp.zeros((num_nodes,), jnp.int32), "fixed": jnp.zeros((num_nodes,), bool),
               "mask": jnp.zeros((num_nodes,), bool)},
        edges={"shift": jnp.zeros((num_edges, 3)), "mask": mask},
        senders=zeros_i, receivers=zeros_i, n_node=jnp.array([num_nodes], jnp.int32),
        n_edge=jnp.array([num_edges], jnp.int32), globals={"mask": jnp.zeros((1,), bool)})
    empty = EdgeSlots(edge=jnp.full((num_nodes, 1), num_edges, jnp.int32), mask=jnp.zeros((num_nodes, 1), bool),
                      slot_of_edge=jnp.full((num_edges,), num_nodes, jnp.int32))
    return GraphBatch(graph=graph, id_swap=zeros_i, a2ee2a=edge_set, qint=edge_set, a2a=edge_set,
                      main_slots=empty, a2ee2a_slots=empty, qint_slots=empty, a2a_slots=empty)


def variable_shapes(config: BackboneConfig, num_tasks: int) -> dict[str, Any]:
    """Shapes/dtypes of every JMPModel variable ({'params', 'constants'}) without allocating them."""
    model = JMPModel(config, num_tasks)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), placeholder_batch()))
    return {col: shapes[col] for col in ("params", "constants")}
