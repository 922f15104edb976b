"""Geometry, radial/circular/spherical bases and the shared basis down-projections (spec §1.3).

All geometry and raw bases are computed in float32 (or float64 under x64), whatever the compute dtype.
Every GemNet-OC radial basis in JMP is the same function (fixed d/12, p=5 envelope, gaussians on
[0, 1]), so each graph's raw radial basis is computed once and shared by all its users.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jmp_jax.graph.types import GraphBatch
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.layers import BasisEmbedding, Dense, EdgeEmbedding


def safe_norm(x: jax.Array) -> jax.Array:
    """|x| over the last axis, (...,3) -> (...); 0 with a zero (not NaN) gradient at x = 0."""
    sq = jnp.sum(x * x, axis=-1)
    nonzero = sq > 0
    return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)


def edge_geometry(positions: jax.Array, senders: jax.Array, receivers: jax.Array,
                  shift: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Distance d_st (E,) and unit vector V_st (E, 3) of D_st = pos[t] - (pos[s] + shift).

    Zero-length (padding) edges give d = 0 and V = 0 with finite gradients.
    """
    vec = positions[receivers] - (positions[senders] + shift.astype(positions.dtype))
    dist = safe_norm(vec)
    unit = vec / jnp.where(dist > 0, dist, 1.0)[:, None]
    return dist, unit


def gaussian_offsets(num_radial: int) -> np.ndarray:
    """Gaussian centres linspace(0, 1, R), rounded to float32 like the reference's buffer (R,)."""
    return np.linspace(0.0, 1.0, num_radial).astype(np.float32)


def gaussian_temps(num_radial: int) -> np.ndarray:
    """Gaussian inverse widths 0.5 / (1/(R-1))^2, float32 like the reference's buffer (R,)."""
    return np.full((num_radial,), 0.5 / (1.0 / (num_radial - 1)) ** 2, dtype=np.float32)


def radial_basis(dist: jax.Array, config: BackboneConfig) -> jax.Array:
    """Polynomial envelope times gaussian basis of d / absolute_rbf_cutoff: (E,) -> (E, R)."""
    p = config.envelope_exponent
    x = dist / config.absolute_rbf_cutoff
    a, b, c = -(p + 1) * (p + 2) / 2, p * (p + 2), -p * (p + 1) / 2
    envelope = jnp.where(x < 1, 1 + a * x ** p + b * x ** (p + 1) + c * x ** (p + 2), 0.0)
    offsets = jnp.asarray(gaussian_offsets(config.num_radial), dist.dtype)
    temps = jnp.asarray(gaussian_temps(config.num_radial), dist.dtype)
    return envelope[:, None] * jnp.exp(-temps * (x[:, None] - offsets) ** 2)


def legendre_basis(cos_angle: jax.Array, num_spherical: int) -> jax.Array:
    """Real spherical harmonics with m = 0, Y_l^0 = sqrt((2l+1)/4pi) P_l(cos), l < S: (J,) -> (J, S).

    Bonnet's recursion. Equals e3nn_jax's Y_l^0 with "integral" normalisation (checked in the tests);
    e3nn_jax would compute every order m, here only the S terms with m = 0 are needed.
    """
    polys = [jnp.ones_like(cos_angle), cos_angle]
    for l in range(1, num_spherical - 1):
        polys.append(((2 * l + 1) * cos_angle * polys[l] - l * polys[l - 1]) / (l + 1))
    norms = np.sqrt((2 * np.arange(num_spherical) + 1) / (4 * np.pi))
    return jnp.stack(polys[:num_spherical], axis=-1) * jnp.asarray(norms, cos_angle.dtype)


def cos_clamped(u: jax.Array, v: jax.Array) -> jax.Array:
    """clamp(u . v, -1, 1) for unit vectors (J, 3) -> (J,)."""
    return jnp.clip(jnp.sum(u * v, axis=-1), -1.0, 1.0)


def angle_between(u: jax.Array, v: jax.Array) -> jax.Array:
    """atan2(max(|u x v|, 1e-9), u . v): (J, 3), (J, 3) -> (J,)."""
    return jnp.arctan2(jnp.maximum(safe_norm(jnp.cross(u, v)), 1e-9), jnp.sum(u * v, axis=-1))


class TripletBasis(NamedTuple):
    """Bases of one triplet interaction: `rad` for mlp_rbf (per input-side edge), the efficient circular
    basis rad_w1 (per output edge, (E_out, cbf, S)) and `sph` (T, S) per triplet."""

    rad: jax.Array
    rad_w1: jax.Array
    sph: jax.Array


class QuadBasis(NamedTuple):
    """Quadruplet bases: rad (E, rbf); cir (T_in, cbf) per qint triplet; rad_w1 (E, sbf, S*S);
    sph_cab (T_out, S) per output triplet and sph_dihedral (Q, S) per quadruplet, whose outer product
    (cab-major) is the reference's 49-channel legendre_outer basis."""

    rad: jax.Array
    cir: jax.Array
    rad_w1: jax.Array
    sph_cab: jax.Array
    sph_dihedral: jax.Array


class BasesOutput(NamedTuple):
    m: jax.Array            # (E, emb_edge) initial edge embedding
    atom_update: jax.Array  # (E, rbf)
    output: jax.Array       # (E, rbf)
    e2e: TripletBasis
    qint: QuadBasis
    a2e: TripletBasis
    e2a: TripletBasis
    a2a_rad: jax.Array      # (E_a2a, rbf)
    V_st: jax.Array         # (E, 3)
    D_st: jax.Array         # (E,)


class Bases(nn.Module):
    """Geometry, raw bases and the shared down-projections (`backbone/bases/...`)."""

    config: BackboneConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, batch: GraphBatch) -> BasesOutput:
        cfg, S = self.config, self.config.num_spherical
        graph = batch.graph
        pos = graph.nodes["positions"]
        d_main, v_main = edge_geometry(pos, graph.senders, graph.receivers, graph.edges["shift"])
        d_qint, v_qint = edge_geometry(pos, batch.qint.senders, batch.qint.receivers, batch.qint.shift)
        d_ae, v_ae = edge_geometry(pos, batch.a2ee2a.senders, batch.a2ee2a.receivers, batch.a2ee2a.shift)
        d_aa, _ = edge_geometry(pos, batch.a2a.senders, batch.a2a.receivers, batch.a2a.shift)
        rbf_main, rbf_qint = radial_basis(d_main, cfg), radial_basis(d_qint, cfg)
        rbf_ae, rbf_aa = radial_basis(d_ae, cfg), radial_basis(d_aa, cfg)

        def rbf_dense(name: str, rbf: jax.Array) -> jax.Array:
            return Dense(cfg.emb_size_rbf, dtype=rbf.dtype, name=name)(rbf)

        def cbf_embedding(name: str, rbf: jax.Array) -> jax.Array:
            return BasisEmbedding(cfg.emb_size_cbf, S, name=name)(rbf)

        # Triplets c->a <- b over the main graph.
        t = batch.trip_e2e
        e2e = TripletBasis(rbf_dense("mlp_rbf_tint", rbf_main), cbf_embedding("mlp_cbf_tint", rbf_main),
                           legendre_basis(cos_clamped(v_main[t.edge_out], v_main[t.edge_in]), S))

        # Quadruplets d -> b -> a <- c.
        q = batch.quad
        v_ba_in, v_db = v_qint[q.triplet_in.edge_out], v_main[q.triplet_in.edge_in]
        v_ca, v_ba_out = v_main[q.triplet_out.edge_out], v_qint[q.triplet_out.edge_in]
        dihedral = angle_between(jnp.cross(v_ca, v_ba_out)[q.trip_out_to_quad],
                                 jnp.cross(v_db, v_ba_in)[q.trip_in_to_quad])
        cbf_qint = cbf_embedding("mlp_cbf_qint", rbf_qint)[q.triplet_in.edge_out]
        qint = QuadBasis(
            rad=rbf_dense("mlp_rbf_qint", rbf_main),
            cir=jnp.einsum("tks,ts->tk", cbf_qint, legendre_basis(cos_clamped(v_ba_in, v_db), S)),
            rad_w1=BasisEmbedding(cfg.emb_size_sbf, S * S, name="mlp_sbf_qint")(rbf_main),
            sph_cab=legendre_basis(cos_clamped(v_ca, v_ba_out), S),
            sph_dihedral=legendre_basis(jnp.cos(dihedral), S))

        # Atom -> edge: a2ee2a edge b->a into main edge c->a; edge -> atom: main b->a into a2ee2a c->a.
        ta, te = batch.trip_a2e, batch.trip_e2a
        a2e = TripletBasis(rbf_dense("mlp_rbf_aeint", rbf_ae), cbf_embedding("mlp_cbf_aeint", rbf_main),
                           legendre_basis(cos_clamped(v_main[ta.edge_out], v_ae[ta.edge_in]), S))
        e2a = TripletBasis(rbf_dense("mlp_rbf_eaint", rbf_main), cbf_embedding("mlp_cbf_eaint", rbf_ae),
                           legendre_basis(cos_clamped(v_ae[te.edge_out], v_main[te.edge_in]), S))
        a2a_rad = BasisEmbedding(cfg.emb_size_rbf, name="mlp_rbf_aint")(rbf_aa)

        atom_update = rbf_dense("mlp_rbf_h", rbf_main)
        output = rbf_dense("mlp_rbf_out", rbf_main)
        m = EdgeEmbedding(cfg.emb_size_edge, dtype=self.dtype, name="edge_emb")(
            h, rbf_main, graph.senders, graph.receivers)
        return BasesOutput(m, atom_update, output, e2e, qint, a2e, e2a, a2a_rad, v_main, d_main)
