"""GemNet-OC interaction, atom-update and output blocks (spec §1.5, §1.6)."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.graph.types import EdgeSet, GraphBatch, QuadrupletIndex, TripletIndex
from jmp_jax.models.bases import BasesOutput, QuadBasis, TripletBasis
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.layers import (INV_SQRT_2, Dense, EdgeEmbedding, EfficientBilinear, ScaleFactor,
                                   aggregate_outer, dense_then_residuals, residual_stack, segment_sum)


def symmetric_up_projection(x: jax.Array, features: int, id_swap: jax.Array | None, dtype: Any) -> jax.Array:
    """(act(W_ca x) + act(W_ac x)[id_swap]) / sqrt(2), or act(W_ca x) alone when id_swap is None.

    Called inside a parent's compact method (creates `up_projection_ca` / `up_projection_ac`).
    """
    x_ca = Dense(features, activation=True, dtype=dtype, name="up_projection_ca")(x)
    if id_swap is None:
        return x_ca
    x_ac = Dense(features, activation=True, dtype=dtype, name="up_projection_ac")(x)
    return (x_ca + x_ac[id_swap]) * INV_SQRT_2


class TripletInteraction(nn.Module):
    """Triplet message passing b->a into c->a (e2e, a2e, e2a).

    x_in: (E_in or N, in) input features; `expand_idx` gathers atom features onto a2ee2a edges (a2e);
    `agg2` = (atom of each output edge, N) sums the output edges into atoms (e2a);
    `id_swap` None disables the symmetric a->c branch (e2a).
    """

    features: int
    emb_size_trip_in: int
    emb_size_trip_out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_in: jax.Array, basis: TripletBasis, trip: TripletIndex, id_swap: jax.Array | None,
                 expand_idx: jax.Array | None = None, agg2: tuple[jax.Array, int] | None = None) -> jax.Array:
        width = x_in.shape[-1]
        x = Dense(width, activation=True, dtype=self.dtype, name="dense_ba")(x_in)
        if expand_idx is not None:
            x = x[expand_idx]
        x = ScaleFactor(name="scale_rbf")(x * Dense(width, dtype=self.dtype, name="mlp_rbf")(basis.rad))
        x = Dense(self.emb_size_trip_in, activation=True, dtype=self.dtype, name="down_projection")(x)
        sph_m = aggregate_outer(basis.sph, x[trip.edge_in], trip.edge_out, basis.rad_w1.shape[0])
        x = EfficientBilinear(self.emb_size_trip_out, dtype=self.dtype, name="mlp_cbf")(basis.rad_w1, sph_m, agg2)
        x = ScaleFactor(name="scale_cbf_sum")(x)
        return symmetric_up_projection(x, self.features, id_swap, self.dtype)


class QuadrupletInteraction(nn.Module):
    """Quadruplet message passing d->b->a<-c into the main edge c->a.

    The 49-channel basis is outer(Y(cos_cab), Y(cos dihedral)); it is contracted in two steps (over the
    quadruplets of each output triplet, then over the triplets of each edge), which needs the graph
    invariant quad.edge_out == triplet_out.edge_out[trip_out_to_quad] and never builds (Q, 49, in).
    """

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array, basis: QuadBasis, quad: QuadrupletIndex, id_swap: jax.Array) -> jax.Array:
        cfg = self.config
        x = Dense(m.shape[-1], activation=True, dtype=self.dtype, name="dense_db")(m)
        x = ScaleFactor(name="scale_rbf")(x * Dense(m.shape[-1], dtype=self.dtype, name="mlp_rbf")(basis.rad))
        x = Dense(cfg.emb_size_quad_in, activation=True, dtype=self.dtype, name="down_projection")(x)
        x = x[quad.triplet_in.edge_in]
        x = ScaleFactor(name="scale_cbf")(x * Dense(cfg.emb_size_quad_in, dtype=self.dtype, name="mlp_cbf")(basis.cir))
        x = x[quad.trip_in_to_quad]
        num_trip_out = basis.sph_cab.shape[0]
        per_trip = aggregate_outer(basis.sph_dihedral, x, quad.trip_out_to_quad, num_trip_out)  # (T_out, S, in)
        per_trip = basis.sph_cab.astype(per_trip.dtype)[:, :, None, None] * per_trip[:, None]   # (T_out, S, S, in)
        sph_m = segment_sum(per_trip.reshape(num_trip_out, -1, per_trip.shape[-1]), quad.triplet_out.edge_out,
                            m.shape[0])
        x = EfficientBilinear(cfg.emb_size_quad_out, dtype=self.dtype, name="mlp_sbf")(basis.rad_w1, sph_m)
        x = ScaleFactor(name="scale_sbf_sum")(x)
        return symmetric_up_projection(x, m.shape[-1], id_swap, self.dtype)


class PairInteraction(nn.Module):
    """Atom-atom message passing over the a2a graph: h (N, A) -> (N, A)."""

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, rad: jax.Array, a2a: EdgeSet) -> jax.Array:
        cfg = self.config
        x = Dense(cfg.emb_size_aint_in, activation=True, dtype=self.dtype, name="down_projection")(h)
        agg = aggregate_outer(rad, x[a2a.senders], a2a.receivers, h.shape[0])  # (N, rbf, in)
        y = Dense(cfg.emb_size_aint_out, dtype=self.dtype, name="bilinear")(agg.reshape(h.shape[0], -1))
        y = ScaleFactor(name="scale_rbf_sum")(y)
        return Dense(h.shape[-1], activation=True, dtype=self.dtype, name="up_projection")(y)


def sum_edges_into_atoms(m: jax.Array, basis_rad: jax.Array, receivers: jax.Array, num_atoms: int,
                         dtype: Any, boost: float = 1.0) -> jax.Array:
    """scale_sum( boost * sum_{edges -> t} m * dense_rbf(rbf) ): (E, E_dim) -> (N, E_dim).

    Called inside a compact method. `boost` = 1/(1 - edge_dropout) compensates dropped edges in training.
    """
    x = m * Dense(m.shape[-1], dtype=dtype, name="dense_rbf")(basis_rad)
    x = segment_sum(x, receivers, num_atoms)
    return ScaleFactor(name="scale_sum")(x * boost if boost != 1.0 else x)


class AtomUpdateBlock(nn.Module):
    """Aggregates edge messages into atoms, then Dense (if E != A) and num_atom ResidualLayers."""

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array, basis_rad: jax.Array, receivers: jax.Array, num_atoms: int) -> jax.Array:
        x = sum_edges_into_atoms(m, basis_rad, receivers, num_atoms, self.dtype)
        return dense_then_residuals(x, self.config.emb_size_atom, self.config.num_atom, "layers", self.dtype)


class OutputBlock(nn.Module):
    """Per-block energy (N, A) and direct-force (E, E_dim) features; x_F is None without direct forces.

    train=True with config.edge_dropout divides the aggregated energy message by (1 - edge_dropout), as
    the reference does for graphs whose a2a edges were dropped.
    """

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, m: jax.Array, basis_rad: jax.Array, receivers: jax.Array,
                 train: bool = False) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        boost = 1.0 / (1.0 - cfg.edge_dropout) if train and cfg.edge_dropout else 1.0
        x_e = sum_edges_into_atoms(m, basis_rad, receivers, h.shape[0], self.dtype, boost)
        x_e = dense_then_residuals(x_e, cfg.emb_size_atom, cfg.num_atom, "layers", self.dtype)
        if cfg.num_output_afteratom >= 1:
            x_e = (x_e + h) * INV_SQRT_2
            x_e = residual_stack(x_e, cfg.num_output_afteratom, "seq_energy2", self.dtype)
        if not cfg.direct_forces:
            return x_e, None
        x_f = dense_then_residuals(m, cfg.emb_size_edge, cfg.num_atom, "seq_forces", self.dtype)
        x_f = ScaleFactor(name="scale_rbf_F")(x_f * Dense(cfg.emb_size_edge, dtype=self.dtype,
                                                           name="dense_rbf_F")(basis_rad))
        return x_e, x_f


class InteractionBlock(nn.Module):
    """One GemNet-OC interaction block: (h (N, A), m (E, E_dim)) -> updated (h, m)."""

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, m: jax.Array, bases: BasesOutput,
                 batch: GraphBatch) -> tuple[jax.Array, jax.Array]:
        cfg, dt = self.config, self.dtype
        num_atoms = h.shape[0]
        receivers = batch.graph.receivers

        def triplet(name: str, features: int) -> TripletInteraction:
            return TripletInteraction(features, cfg.emb_size_trip_in, cfg.emb_size_trip_out, dtype=dt, name=name)

        x_skip = Dense(cfg.emb_size_edge, activation=True, dtype=dt, name="dense_ca")(m)
        x_e2e = triplet("trip_interaction", cfg.emb_size_edge)(m, bases.e2e, batch.trip_e2e, batch.id_swap)
        x_qint = QuadrupletInteraction(cfg, dtype=dt, name="quad_interaction")(m, bases.qint, batch.quad,
                                                                                batch.id_swap)
        x_a2e = triplet("atom_edge_interaction", cfg.emb_size_edge)(
            h, bases.a2e, batch.trip_a2e, batch.id_swap, expand_idx=batch.a2ee2a.senders)
        h_e2a = triplet("edge_atom_interaction", cfg.emb_size_atom)(
            m, bases.e2a, batch.trip_e2a, None, agg2=(batch.a2ee2a.receivers, num_atoms))
        h_a2a = PairInteraction(cfg, dtype=dt, name="atom_interaction")(h, bases.a2a_rad, batch.a2a)

        x = (x_skip + x_e2e + x_qint + x_a2e) * (1.0 / math.sqrt(4.0))
        h = (h + h_e2a + h_a2a) * (1.0 / math.sqrt(3.0))
        x = residual_stack(x, cfg.num_before_skip, "layers_before_skip", dt)
        m = (m + x) * INV_SQRT_2
        m = residual_stack(m, cfg.num_after_skip, "layers_after_skip", dt)
        h = residual_stack(h, cfg.num_atom_emb_layers, "atom_emb_layers", dt)
        h2 = AtomUpdateBlock(cfg, dtype=dt, name="atom_update")(m, bases.atom_update, receivers, num_atoms)
        h = (h + h2) * INV_SQRT_2
        m2 = EdgeEmbedding(cfg.emb_size_edge, dtype=dt, name="concat_layer")(h, m, batch.graph.senders, receivers)
        m2 = residual_stack(m2, cfg.num_concat, "residual_m", dt)
        return h, (m + m2) * INV_SQRT_2
