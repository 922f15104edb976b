"""The GemNet-OC backbone as JMP uses it (docs/jmp_spec.md §1.5-1.6): atom embeddings in, per-atom energy features
and per-edge direct-force features out. Parameters live under `backbone/...` in JMPModel."""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.graph.types import GraphBatch
from jmp_jax.models.bases import Bases
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.interactions import InteractionBlock, OutputBlock
from jmp_jax.models.layers import Dense, residual_stack


class BackboneOutput(NamedTuple):
    energy_features: jax.Array         # (N, A)
    force_features: jax.Array | None   # (E, E_dim), None without direct forces
    V_st: jax.Array                    # (E, 3) unit vector s -> t of the main graph
    D_st: jax.Array                    # (E,) distance


class FinalMLP(nn.Module):
    """Dense(in -> features, act) named `out_mlp_0`, then ResidualLayers `out_mlp_{1..}`."""

    features: int
    num_layers: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = Dense(self.features, activation=True, dtype=self.dtype, name="out_mlp_0")(x)
        return residual_stack(x, self.num_layers, "out_mlp", self.dtype, start=1)


class GemNetOCBackbone(nn.Module):
    """GemNet-OC backbone: (h (N, A), batch, train) -> BackboneOutput.

    `train` only enables the edge-dropout compensation (config.edge_dropout); there is no other dropout.

    Sows per-layer intermediates (collection `intermediates`): m_bases, xE_out{k}, xF_out{k},
    h_block{k}, m_block{k}, energy_features, force_features.
    """

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, batch: GraphBatch, train: bool = False) -> BackboneOutput:
        cfg = self.config
        if cfg.num_spherical < 2:
            raise ValueError(f"num_spherical must be >= 2, got {cfg.num_spherical}")
        bases = Bases(cfg, dtype=self.dtype, name="bases")(h, batch)
        m = bases.m
        self.sow("intermediates", "m_bases", m)

        xs_e, xs_f = [], []
        for k in range(cfg.num_blocks + 1):
            if k > 0:
                h, m = InteractionBlock(cfg, dtype=self.dtype, name=f"int_blocks_{k - 1}")(h, m, bases, batch)
                self.sow("intermediates", f"h_block{k - 1}", h)
                self.sow("intermediates", f"m_block{k - 1}", m)
            x_e, x_f = OutputBlock(cfg, dtype=self.dtype, name=f"out_blocks_{k}")(h, m, bases.output,
                                                                                  batch.main_slots, train)
            self.sow("intermediates", f"xE_out{k}", x_e)
            xs_e.append(x_e)
            if x_f is not None:
                self.sow("intermediates", f"xF_out{k}", x_f)
                xs_f.append(x_f)

        energy = FinalMLP(cfg.emb_size_atom, cfg.num_global_out_layers, dtype=self.dtype,
                          name="out_mlp_E")(jnp.concatenate(xs_e, axis=-1))
        self.sow("intermediates", "energy_features", energy)
        forces = None
        if cfg.direct_forces:
            forces = FinalMLP(cfg.emb_size_edge, cfg.num_global_out_layers, dtype=self.dtype,
                              name="out_mlp_F")(jnp.concatenate(xs_f, axis=-1))
            self.sow("intermediates", "force_features", forces)
        return BackboneOutput(energy, forces, bases.V_st, bases.D_st)
