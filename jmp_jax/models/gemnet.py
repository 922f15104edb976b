"""The GemNet-OC backbone as JMP uses it (docs/jmp_spec.md §1.5-1.6): atom embeddings in, per-atom energy features
and per-edge direct-force features out. Parameters live under `backbone/...` in JMPModel."""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.graph.types import GraphBatch
from jmp_jax.models.bases import Bases, BasesOutput
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.interactions import InteractionBlock, OutputBlock
from jmp_jax.models.layers import Dense, residual_stack
from jmp_jax.models.recompute import recomputed_in_backward


class BackboneOutput(NamedTuple):
    energy_features: jax.Array         # (N, A)
    force_features: jax.Array | None   # (E, E_dim), None without direct forces
    V_st: jax.Array                    # (E, 3) unit vector s -> t of the main graph
    D_st: jax.Array                    # (E,) distance


class FinalMLP(nn.Module):
    """Dense(in -> features, act) named `out_mlp_0`, then ResidualLayers `out_mlp_{1..}`. The input may be a
    list of arrays standing for their concatenation (see `Dense`)."""

    features: int
    num_layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | list[jax.Array]) -> jax.Array:
        x = Dense(self.features, activation=True, dtype=self.dtype, name="out_mlp_0")(x)
        return residual_stack(x, self.num_layers, "out_mlp", self.dtype, start=1)


REMAT_CHOICES = ("none", "block", "nested", "products")


@dataclasses.dataclass(frozen=True)
class BlockExecution:
    """How the backbone runs its interaction blocks; parameters and results do not depend on it.

    scan: one traced and compiled block applied num_blocks times (`jax.lax.scan` over the blocks'
      parameters, stacked at trace time from their per-block entries, so the parameter tree keeps one
      subtree per block). False unrolls the blocks, as `init` always does.
    remat: "block" keeps only each interaction and output block's inputs for the backward pass, which
      recomputes the block (`recomputed_in_backward`); "none" keeps every intermediate. Unrolled, "block"
      keeps the last output block's intermediates: its backward runs first, right after the forward. (The
      last interaction block's would raise the peak: they would be live through the output blocks' forward
      pass.) "nested" recomputes every block, and within an interaction block's backward each of its five
      message-passing interactions and its residual layers on edges one at a time, and the bases' edge
      embedding: less memory for about one more forward pass of them. The first output block (before the
      interaction blocks) is recomputed too, at the end of the backward. "products" recomputes as "block"
      does, but keeps the outputs of the blocks' wide matrix products (`recompute.KEPT_PRODUCT`): the
      backward pass recomputes only the cheap work between them (JMP-S slabs: a fifth less work than
      "block" for 60% more temporaries).
    """

    scan: bool = False
    remat: str = "block"

    def __post_init__(self):
        if self.remat not in REMAT_CHOICES:
            raise ValueError(f"model.remat must be one of {REMAT_CHOICES}, not {self.remat!r}")

    @property
    def keeps_products(self) -> bool:
        """Recomputed blocks keep their wide products' outputs (`recomputed_in_backward`'s keep_products)."""
        return self.remat == "products"


def interaction_step(execution: BlockExecution, config: BackboneConfig, dtype: Any, int_name: str,
                     out_name: str, h: jax.Array, m: jax.Array, bases: BasesOutput, batch: GraphBatch,
                     train: bool, last: bool = False) -> tuple[jax.Array, ...]:
    """Interaction block `int_name` then output block `out_name`, the unit the backbone repeats:
    -> (h (N, A), m (E, E_dim), x_E (N, A), x_F (E, E_dim) or None, the bases for the next unit). `last`: the
    backbone's last unit, whose output block keeps its intermediates (see BlockExecution.remat).

    Called inside a parent's compact method (the blocks become its children under these names; remat
    leaves the names as they are).
    """
    interaction = InteractionBlock(config, dtype=dtype, recompute_layers=execution.remat == "nested",
                                   name=int_name)
    output = OutputBlock(config, dtype=dtype, name=out_name)
    if execution.remat == "none":
        h, m = interaction(h, m, bases, batch)
    elif execution.scan:
        h, m = recomputed_in_backward(interaction, h, m, bases, batch, keep_products=execution.keeps_products)
    else:
        # The quadruplet basis rad_w1 (E, sbf, S*S), the largest basis computed from parameters, passes through
        # the block to the next one, so that the backward pass sums its cotangents block by block: XLA kept each
        # block's until the end (JMP-S slabs: 3 x 52 MiB at the gradient's peak).
        (rad_w1,), (h, m) = recomputed_in_backward(interaction, bases.qint.rad_w1, h, m, bases, batch, passed=1,
                                                   keep_products=execution.keeps_products)
        bases = bases._replace(qint=bases.qint._replace(rad_w1=rad_w1))
    return output_step(execution, output, h, m, bases, batch, train, keep=last) + (bases,)


def output_step(execution: BlockExecution, output: nn.Module, h: jax.Array, m: jax.Array, bases: BasesOutput,
                batch: GraphBatch, train: bool, keep: bool) -> tuple[jax.Array, ...]:
    """Output block `output` on (h, m): -> (h, m, x_E, x_F). `keep`: its intermediates are kept for the
    backward pass even under remat (the last block's: its backward comes first).

    Recomputed, h and m pass through the recomputed call unchanged, so that its backward waits for their
    cotangents from the next blocks instead of running where the output block's own cotangents appear, at
    the start of the backward pass (`recomputed_in_backward`).
    """
    if execution.remat == "none" or (keep and execution.remat != "nested"):
        return (h, m) + output(h, m, bases.output, batch.main_slots, train)
    (h, m), (x_e, x_f) = recomputed_in_backward(output, h, m, h, m, bases.output, batch.main_slots, passed=2,
                                                train=train, keep_products=execution.keeps_products)
    return h, m, x_e, x_f


class InteractionStep(nn.Module):
    """`interaction_step` as a module of its own (children `int_block`, `out_block`): the body of the scan."""

    config: BackboneConfig
    dtype: Any = jnp.float32
    execution: BlockExecution = BlockExecution()

    @nn.compact
    def __call__(self, h: jax.Array, m: jax.Array, bases: BasesOutput, batch: GraphBatch,
                 train: bool) -> tuple[jax.Array, ...]:
        return interaction_step(self.execution, self.config, self.dtype, "int_block", "out_block", h, m, bases,
                                batch, train)[:4]


class GemNetOCBackbone(nn.Module):
    """GemNet-OC backbone: (h (N, A), batch, train) -> BackboneOutput.

    `train` only enables the edge-dropout compensation (config.edge_dropout); there is no other dropout.

    Sows per-layer intermediates (collection `intermediates`): m_bases, xE_out{k}, xF_out{k},
    h_block{k}, m_block{k}, energy_features, force_features.
    """

    config: BackboneConfig
    dtype: Any = jnp.float32
    execution: BlockExecution = BlockExecution()

    @nn.compact
    def __call__(self, h: jax.Array, batch: GraphBatch, train: bool = False) -> BackboneOutput:
        cfg = self.config
        if cfg.num_spherical < 2:
            raise ValueError(f"num_spherical must be >= 2, got {cfg.num_spherical}")
        nested = self.execution.remat == "nested"
        bases = Bases(cfg, dtype=self.dtype, recompute_embedding=nested, name="bases")(h, batch)
        m = bases.m
        self.sow("intermediates", "m_bases", m)
        h, m, x_e, x_f = output_step(self.execution, OutputBlock(cfg, dtype=self.dtype, name="out_blocks_0"), h, m,
                                     bases, batch, train, keep=cfg.num_blocks == 0)
        per_block = [(x_e, x_f)]
        if self.execution.scan and not self.is_initializing() and cfg.num_blocks > 0:
            blocks = self._scanned_blocks(h, m, bases, batch, train)
        else:
            blocks = []
            for k in range(cfg.num_blocks):
                h, m, x_e, x_f, bases = interaction_step(self.execution, cfg, self.dtype, f"int_blocks_{k}",
                                                         f"out_blocks_{k + 1}", h, m, bases, batch, train,
                                                         last=k == cfg.num_blocks - 1)
                blocks.append((h, m, x_e, x_f))
        for k, (h, m, x_e, x_f) in enumerate(blocks):
            self.sow("intermediates", f"h_block{k}", h)
            self.sow("intermediates", f"m_block{k}", m)
            per_block.append((x_e, x_f))
        for k, (x_e, x_f) in enumerate(per_block):
            self.sow("intermediates", f"xE_out{k}", x_e)
            if x_f is not None:
                self.sow("intermediates", f"xF_out{k}", x_f)

        energy = FinalMLP(cfg.emb_size_atom, cfg.num_global_out_layers, dtype=self.dtype,
                          name="out_mlp_E")(jnp.concatenate([x_e for x_e, _ in per_block], axis=-1))
        self.sow("intermediates", "energy_features", energy)
        forces = None
        if cfg.direct_forces:
            forces = FinalMLP(cfg.emb_size_edge, cfg.num_global_out_layers, dtype=self.dtype,
                              name="out_mlp_F")([x_f for _, x_f in per_block])
            self.sow("intermediates", "force_features", forces)
        return BackboneOutput(energy, forces, bases.V_st, bases.D_st)

    def _scanned_blocks(self, h: jax.Array, m: jax.Array, bases: BasesOutput, batch: GraphBatch,
                        train: bool) -> list[tuple[jax.Array, ...]]:
        """The blocks' (h, m, x_E, x_F) as `jax.lax.scan` computes them: one traced block, whose variables
        (every collection: params and the fitted scale factors) are the per-block entries stacked."""
        cfg = self.config
        names = [(f"int_blocks_{k}", f"out_blocks_{k + 1}") for k in range(cfg.num_blocks)]
        stacked = {col: jax.tree.map(lambda *xs: jnp.stack(xs),
                                     *[{"int_block": tree[i], "out_block": tree[o]} for i, o in names])
                   for col, tree in self.variables.items() if names[0][0] in tree}
        step = InteractionStep(cfg, self.dtype, self.execution, parent=None)
        keep_states = self.is_mutable_collection("intermediates")

        def body(carry, variables):
            h, m, x_e, x_f = step.apply(variables, *carry, bases, batch, train)
            return (h, m), ((h, m) if keep_states else None, x_e, x_f)

        _, (states, xs_e, xs_f) = jax.lax.scan(body, (h, m), stacked)
        hs, ms = states if keep_states else ([None] * cfg.num_blocks,) * 2
        return [(hs[k], ms[k], xs_e[k], None if xs_f is None else xs_f[k]) for k in range(cfg.num_blocks)]
