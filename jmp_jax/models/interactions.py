"""GemNet-OC interaction, atom-update and output blocks (docs/jmp_spec.md §1.5, §1.6)."""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.graph.types import EdgeSet, EdgeSlots, GraphBatch
from jmp_jax.models import slot_ops
from jmp_jax.models.bases import BasesOutput, QuadBasis, TripletBasis
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.kernels import batched_matmul
from jmp_jax.models.recompute import recomputed_in_backward
from jmp_jax.models.layers import (Dense, EdgeEmbedding, EfficientBilinear, ScaleFactor,
                                   dense_then_residuals, residual_stack, scaled_sum)


def symmetric_up_projection(x: jax.Array, features: int, id_swap: jax.Array | None, dtype: Any) -> jax.Array:
    """(act(W_ca x) + act(W_ac x)[id_swap]) / sqrt(2), or act(W_ca x) alone when id_swap is None.

    Called inside a parent's compact method (creates `up_projection_ca` / `up_projection_ac`).
    """
    x_ca = Dense(features, activation=True, dtype=dtype, name="up_projection_ca")(x)
    if id_swap is None:
        return x_ca
    x_ac = Dense(features, activation=True, dtype=dtype, name="up_projection_ac")(x)
    return scaled_sum(x_ca, slot_ops.swap_edges(x_ac, id_swap))


def contract(spec: str, *operands: jax.Array) -> jax.Array:
    """einsum accumulated in at least float32 (sums over up to hundreds of slots), in operand 0's dtype."""
    acc = jnp.promote_types(operands[0].dtype, jnp.float32)
    return jnp.einsum(spec, *operands, preferred_element_type=acc).astype(operands[0].dtype)


class TripletInteraction(nn.Module):
    """Triplet message passing b->a into c->a (e2e, a2e, e2a), dense over the slots of each atom a.

    x_in: (E_in or N, in) input features, E_in the edges of `in_slots`; `expand_idx` gathers atom
    features onto those edges (a2e). The output is per edge of `out_slots`, or with `to_atoms` the
    sum over the output edges into each atom (e2a). `id_swap` None disables the symmetric a->c branch.
    """

    features: int
    emb_size_trip_in: int
    emb_size_trip_out: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_in: jax.Array, basis: TripletBasis, in_slots: EdgeSlots, out_slots: EdgeSlots,
                 id_swap: jax.Array | None, expand_idx: jax.Array | None = None,
                 to_atoms: bool = False) -> jax.Array:
        width = x_in.shape[-1]
        x = Dense(width, activation=True, dtype=self.dtype, name="dense_ba")(x_in)
        if expand_idx is not None:
            x = x[expand_idx]
        x = ScaleFactor(name="scale_rbf")(x * Dense(width, dtype=self.dtype, name="mlp_rbf")(basis.rad))
        x = Dense(self.emb_size_trip_in, activation=True, dtype=self.dtype, name="down_projection")(x)
        sph_m = contract("ajks,aki->ajsi", basis.sph.astype(x.dtype), slot_ops.edges_to_slots(x, in_slots))
        bilinear = EfficientBilinear(self.emb_size_trip_out, dtype=self.dtype, name="mlp_cbf")
        if to_atoms:
            x = bilinear(slot_ops.edges_to_slots(basis.rad_w1, out_slots), sph_m, sum_slots=True)
        else:
            x = bilinear(basis.rad_w1, slot_ops.slots_to_edges(sph_m, out_slots))
        x = ScaleFactor(name="scale_cbf_sum")(x)
        return symmetric_up_projection(x, self.features, id_swap, self.dtype)


class QuadrupletInteraction(nn.Module):
    """Quadruplet message passing d->b->a<-c into the main edge c->a, dense over the main slots j (c->a)
    of a and k (d->b) of b for each qint edge q (b->a).

    The 49-channel basis is outer(Y(cos_cab), Y(cos dihedral)); it is contracted in two steps (over the
    input edges d->b of each qint edge and output slot, then over the qint slots of a) and never builds the
    (Q, 49, in) product.
    """

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array, basis: QuadBasis, batch: GraphBatch) -> jax.Array:
        cfg = self.config
        x = Dense(m.shape[-1], activation=True, dtype=self.dtype, name="dense_db")(m)
        x = ScaleFactor(name="scale_rbf")(x * Dense(m.shape[-1], dtype=self.dtype, name="mlp_rbf")(basis.rad))
        x = Dense(cfg.emb_size_quad_in, activation=True, dtype=self.dtype, name="down_projection")(x)
        # Input triplet (q, k) = edge d->b in slot k of b, the sender of qint edge q.
        x = slot_ops.take_rows(slot_ops.edges_to_slots(x, batch.main_slots), batch.qint.senders)  # (Q, K, in)
        x = ScaleFactor(name="scale_cbf")(x * Dense(cfg.emb_size_quad_in, dtype=self.dtype, name="mlp_cbf")(basis.cir))
        num_qint, num_out, num_sph, num_in = basis.sph_dihedral.shape
        per_trip = batched_matmul(basis.sph_dihedral.astype(x.dtype).reshape(num_qint, -1, num_in), x)
        per_trip = slot_ops.edges_to_slots(per_trip.reshape(num_qint, num_out, num_sph, -1), batch.qint_slots)
        sph_m = contract("aqjt,aqjsi->ajtsi", basis.sph_cab.astype(x.dtype), per_trip)   # (N, K, S, S, in)
        sph_m = slot_ops.slots_to_edges(sph_m.reshape(sph_m.shape[:2] + (-1, sph_m.shape[-1])), batch.main_slots)
        x = EfficientBilinear(cfg.emb_size_quad_out, dtype=self.dtype, name="mlp_sbf")(basis.rad_w1, sph_m)
        x = ScaleFactor(name="scale_sbf_sum")(x)
        return symmetric_up_projection(x, m.shape[-1], batch.id_swap, self.dtype)


class PairInteraction(nn.Module):
    """Atom-atom message passing over the a2a graph, dense over each atom's a2a slots: h (N, A) -> (N, A)."""

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, rad: jax.Array, a2a: EdgeSet, slots: EdgeSlots) -> jax.Array:
        cfg = self.config
        x = Dense(cfg.emb_size_aint_in, activation=True, dtype=self.dtype, name="down_projection")(h)
        x = slot_ops.take_rows(x, slot_ops.slot_sources(a2a.senders, slots))                    # (N, K, in)
        agg = contract("akr,aki->ari", slot_ops.edges_to_slots(rad, slots).astype(x.dtype), x)  # (N, rbf, in)
        y = Dense(cfg.emb_size_aint_out, dtype=self.dtype, name="bilinear")(agg.reshape(h.shape[0], -1))
        y = ScaleFactor(name="scale_rbf_sum")(y)
        return Dense(h.shape[-1], activation=True, dtype=self.dtype, name="up_projection")(y)


def sum_edges_into_atoms(m: jax.Array, basis_rad: jax.Array, slots: EdgeSlots, dtype: Any,
                         boost: float = 1.0) -> jax.Array:
    """scale_sum( boost * sum_{edges -> t} m * dense_rbf(rbf) ): (E, E_dim) -> (N, E_dim).

    Called inside a compact method. `boost` = 1/(1 - edge_dropout) compensates dropped edges in training.
    """
    x = m * Dense(m.shape[-1], dtype=dtype, name="dense_rbf")(basis_rad)
    x = slot_ops.sum_into_atoms(x, slots)
    return ScaleFactor(name="scale_sum")(x * boost if boost != 1.0 else x)


class AtomUpdateBlock(nn.Module):
    """Aggregates edge messages into atoms, then Dense (if E != A) and num_atom ResidualLayers."""

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, m: jax.Array, basis_rad: jax.Array, slots: EdgeSlots) -> jax.Array:
        x = sum_edges_into_atoms(m, basis_rad, slots, self.dtype)
        return dense_then_residuals(x, self.config.emb_size_atom, self.config.num_atom, "layers", self.dtype)


class OutputBlock(nn.Module):
    """Per-block energy (N, A) and direct-force (E, E_dim) features; x_F is None without direct forces.

    train=True with config.edge_dropout divides the aggregated energy message by (1 - edge_dropout), as
    the reference does for graphs whose a2a edges were dropped.
    """

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, m: jax.Array, basis_rad: jax.Array, slots: EdgeSlots,
                 train: bool = False) -> tuple[jax.Array, jax.Array | None]:
        cfg = self.config
        boost = 1.0 / (1.0 - cfg.edge_dropout) if train and cfg.edge_dropout else 1.0
        x_e = sum_edges_into_atoms(m, basis_rad, slots, self.dtype, boost)
        x_e = dense_then_residuals(x_e, cfg.emb_size_atom, cfg.num_atom, "layers", self.dtype)
        if cfg.num_output_afteratom >= 1:
            x_e = scaled_sum(x_e, h)
            x_e = residual_stack(x_e, cfg.num_output_afteratom, "seq_energy2", self.dtype)
        if not cfg.direct_forces:
            return x_e, None
        x_f = dense_then_residuals(m, cfg.emb_size_edge, cfg.num_atom, "seq_forces", self.dtype)
        x_f = ScaleFactor(name="scale_rbf_F")(x_f * Dense(cfg.emb_size_edge, dtype=self.dtype,
                                                           name="dense_rbf_F")(basis_rad))
        return x_e, x_f


class InteractionBlock(nn.Module):
    """One GemNet-OC interaction block: (h (N, A), m (E, E_dim)) -> updated (h, m).

    recompute_layers: the backward pass recomputes each message-passing interaction (triplet, quadruplet,
    atom-edge, edge-atom, atom-atom) and each residual layer on edges from its inputs, one at a time,
    instead of keeping their intermediates (`model.remat="nested"`); results and parameters are the same.
    """

    config: BackboneConfig
    dtype: Any = jnp.float32
    recompute_layers: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, m: jax.Array, bases: BasesOutput,
                 batch: GraphBatch) -> tuple[jax.Array, jax.Array]:
        cfg, dt = self.config, self.dtype
        receivers = batch.graph.receivers

        def triplet(name: str, features: int) -> TripletInteraction:
            return TripletInteraction(features, cfg.emb_size_trip_in, cfg.emb_size_trip_out, dtype=dt, name=name)

        def run(interaction: nn.Module, passed: jax.Array, *inputs, **static) -> tuple[jax.Array, jax.Array]:
            """-> (passed, interaction(*inputs)). `passed`, an input the next interaction uses, goes through
            a recomputed interaction unchanged, so that its recomputation waits for the next one's backward
            (`recomputed_in_backward`): their outputs' cotangents arrive together, and XLA recomputed them all at
            once (measured: the nested slab step's peak held three interactions' intermediates)."""
            if not self.recompute_layers:
                return passed, interaction(*inputs, **static)
            (passed,), out = recomputed_in_backward(interaction, passed, *inputs, passed=1, **static)
            return passed, out

        main, aeea = batch.main_slots, batch.a2ee2a_slots
        # Run order e2e, quad, a2e, e2a, a2a; each passes on what the next one reads (m or h).
        m, x_e2e = run(triplet("trip_interaction", cfg.emb_size_edge), m, m, bases.e2e, main, main, batch.id_swap)
        h, x_qint = run(QuadrupletInteraction(cfg, dtype=dt, name="quad_interaction"), h, m, bases.qint, batch)
        m, x_a2e = run(triplet("atom_edge_interaction", cfg.emb_size_edge), m, h, bases.a2e, aeea, main,
                       batch.id_swap, batch.a2ee2a.senders)
        h, h_e2a = run(triplet("edge_atom_interaction", cfg.emb_size_atom), h, m, bases.e2a, main, aeea, None,
                       to_atoms=True)
        h, h_a2a = run(PairInteraction(cfg, dtype=dt, name="atom_interaction"), h, h, bases.a2a_rad, batch.a2a,
                       batch.a2a_slots)
        x_skip = Dense(cfg.emb_size_edge, activation=True, dtype=dt, name="dense_ca")(m)

        x = scaled_sum(x_skip, x_e2e, x_qint, x_a2e, scale=1.0 / math.sqrt(4.0))
        h = scaled_sum(h, h_e2a, h_a2a, scale=1.0 / math.sqrt(3.0))
        x = residual_stack(x, cfg.num_before_skip, "layers_before_skip", dt, recompute=self.recompute_layers)
        m = scaled_sum(m, x)
        m = residual_stack(m, cfg.num_after_skip, "layers_after_skip", dt, recompute=self.recompute_layers)
        h = residual_stack(h, cfg.num_atom_emb_layers, "atom_emb_layers", dt)
        h2 = AtomUpdateBlock(cfg, dtype=dt, name="atom_update")(m, bases.atom_update, main)
        h = scaled_sum(h, h2)
        m2 = EdgeEmbedding(cfg.emb_size_edge, dtype=dt, name="concat_layer")(h, m, batch.graph.senders, receivers)
        m2 = residual_stack(m2, cfg.num_concat, "residual_m", dt, recompute=self.recompute_layers)
        return h, scaled_sum(m, m2)
