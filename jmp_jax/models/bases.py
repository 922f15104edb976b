"""Geometry, radial/circular/spherical bases and the shared basis down-projections (docs/jmp_spec.md §1.3).

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

from jmp_jax.graph.types import EdgeSet, EdgeSlots, GraphBatch
from jmp_jax.models import slot_ops
from jmp_jax.models.config import BackboneConfig
from jmp_jax.models.kernels import fusion_barrier
from jmp_jax.models.layers import BasisEmbedding, Dense, EdgeEmbedding
from jmp_jax.models.recompute import recomputed_in_backward


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


def legendre_basis(cos_angle: jax.Array, num_spherical: int, axis: int = -1) -> jax.Array:
    """Real spherical harmonics with m = 0, Y_l^0 = sqrt((2l+1)/4pi) P_l(cos), l < S: (J,) -> (J, S),
    the S terms along `axis` of the result.

    Bonnet's recursion. Equals e3nn_jax's Y_l^0 with "integral" normalisation (checked in the tests);
    e3nn_jax would compute every order m, here only the S terms with m = 0 are needed.
    """
    polys = [jnp.ones_like(cos_angle), cos_angle]
    for l in range(1, num_spherical - 1):
        polys.append(((2 * l + 1) * cos_angle * polys[l] - l * polys[l - 1]) / (l + 1))
    norms = np.sqrt((2 * np.arange(num_spherical) + 1) / (4 * np.pi))
    return jnp.stack([p * jnp.asarray(n, cos_angle.dtype) for p, n in zip(polys, norms)], axis=axis)


def cos_clamped(u: jax.Array, v: jax.Array) -> jax.Array:
    """clamp(u . v, -1, 1) for unit vectors (J, 3) -> (J,)."""
    return jnp.clip(jnp.sum(u * v, axis=-1), -1.0, 1.0)


def angle_between(u: jax.Array, v: jax.Array) -> jax.Array:
    """atan2(max(|u x v|, 1e-9), u . v): (J, 3), (J, 3) -> (J,)."""
    return jnp.arctan2(jnp.maximum(safe_norm(jnp.cross(u, v)), 1e-9), jnp.sum(u * v, axis=-1))


# A plane normal shorter than this (the sine of the angle between two unit vectors) is rounding noise: the
# three atoms are collinear, as in every perfect crystal, and the plane, hence the dihedral, is undefined.
COLLINEAR_SINE = 1e-4


def dihedral_cos(normal_a: jax.Array, normal_b: jax.Array) -> jax.Array:
    """cos of the angle between two plane normals: (..., 3), (..., 3) -> (...); 0 where either normal is
    shorter than COLLINEAR_SINE.

    0 is the reference's value at exactly collinear atoms in float64 (its atan2 floor gives pi/2). In
    float32 the normal of collinear atoms is rounding noise of ~1e-7, and the angle between such normals
    is arbitrary: it changes with orientation, translation and atom order, by percents of a crystal's energy.
    """
    degenerate = (safe_norm(normal_a) < COLLINEAR_SINE) | (safe_norm(normal_b) < COLLINEAR_SINE)
    return jnp.where(degenerate, 0.0, jnp.cos(angle_between(normal_a, normal_b)))


class TripletBasis(NamedTuple):
    """Bases of one triplet interaction c->a <- b: `rad` for mlp_rbf (per input edge b->a), the efficient
    circular basis rad_w1 (per output edge, (E_out, cbf, S)) and `sph` (N, K_out, K_in, S): Y_l(cos of
    the angle between the edges in output slot j and input slot k of atom a), zero where (j, k) is no
    triplet (an empty slot, or the input edge being the output edge)."""

    rad: jax.Array
    rad_w1: jax.Array
    sph: jax.Array


class QuadBasis(NamedTuple):
    """Quadruplet bases d->b->a<-c over the qint edges q (b->a) and the main slots of a (j: c->a) and of b
    (k: d->b): rad (E, rbf); cir (Q, K, cbf) per input triplet (q, k); rad_w1 (E, sbf, S*S); sph_cab
    (N, Kq, K, S) per output triplet, laid out on a's qint slots (q is a's slot of edge b->a); sph_dihedral
    (Q, K_j, S, K_k) per quadruplet (q, j, k). Each is zero where its triplet or quadruplet is none. The
    outer product of the last two (cab-major) is the reference's 49-channel legendre_outer basis."""

    rad: jax.Array
    cir: jax.Array
    rad_w1: jax.Array
    sph_cab: jax.Array
    sph_dihedral: jax.Array


class SlotGeometry(NamedTuple):
    """An edge set seen from the per-atom slots: each slot's unit vector, source atom, cell shift, mask.
    Empty slots have a zero vector and source atom N (no atom)."""

    unit: jax.Array    # (N, K, 3)
    sender: jax.Array  # (N, K) int32
    shift: jax.Array   # (N, K, 3)
    mask: jax.Array    # (N, K) bool


def slot_geometry(unit: jax.Array, senders: jax.Array, shift: jax.Array, slots: EdgeSlots) -> SlotGeometry:
    """Per-edge unit vectors (E, 3), senders (E,) and cell shifts (E, 3) laid out on `slots`."""
    return SlotGeometry(slot_ops.take_rows(unit, slots.edge), slot_ops.slot_sources(senders, slots),
                        slot_ops.take_rows(shift.astype(unit.dtype), slots.edge), jnp.asarray(slots.mask))


# Two edges with the same source atom are the same image when their cell shifts (offset @ cell) agree;
# distinct integer offsets differ by a lattice vector, so a loose tolerance (Å^2) is exact.
SAME_IMAGE_TOL = 1e-4


def same_image(sender_a: jax.Array, shift_a: jax.Array, sender_b: jax.Array, shift_b: jax.Array,
               sign: float = -1.0) -> jax.Array:
    """sender_a == sender_b and shift_a + sign * shift_b == 0 (broadcasting; shifts (..., 3))."""
    net = shift_a + sign * shift_b
    return (sender_a == sender_b) & (jnp.sum(net * net, axis=-1) < SAME_IMAGE_TOL)


def masked_legendre(cos_angle: jax.Array, mask: jax.Array, num_spherical: int, axis: int = -1) -> jax.Array:
    """legendre_basis(clip(cos)) where mask, else 0: (...) -> (..., S) (S along `axis`), each materialised once."""
    cos_angle = fusion_barrier(jnp.where(mask, jnp.clip(cos_angle, -1.0, 1.0), 0.0))
    # Bases feed several blocks' contractions: computed once, not re-derived inside each consumer.
    sph = legendre_basis(cos_angle, num_spherical, axis)
    return fusion_barrier(sph * jnp.expand_dims(mask, axis).astype(cos_angle.dtype))


def triplet_sph(out: SlotGeometry, inp: SlotGeometry, num_spherical: int, same_graph: bool) -> jax.Array:
    """(N, K_out, K_in, S) angular basis of triplets c->a (out slot j) <- b (in slot k).

    same_graph (e2e): every other edge into a. Otherwise (mixed graphs) every edge into a except the
    same atom image as the output edge.
    """
    cos = jnp.einsum("ajx,akx->ajk", out.unit, inp.unit)
    mask = out.mask[:, :, None] & inp.mask[:, None, :]
    if same_graph:
        mask &= ~jnp.eye(out.mask.shape[1], dtype=bool)
    else:
        mask &= ~same_image(out.sender[:, :, None], out.shift[:, :, None], inp.sender[:, None, :],
                            inp.shift[:, None, :])
    return masked_legendre(cos, mask, num_spherical)


def quadruplet_geometry(main: SlotGeometry, qint: EdgeSet, qint_unit: jax.Array, num_spherical: int):
    """Angular parts of the quadruplets d->b->a<-c over the qint edges q (b->a, unit vectors (Q, 3)), the
    main slots j (c->a) of a and k (d->b) of b.

    Per qint edge rather than per qint slot of a: qint slots are the sparsest grid (a third full in a Cu
    slab), and the quadruplet grid is the model's largest. Returns sph_abd (Q, K, S) per input triplet (q, k),
    sph_cab (Q, K, S) per output triplet (q, j) and sph_dihedral (Q, K_j, S, K_k) per quadruplet (k last:
    the interaction contracts over it), each zero where the reference has none: d->b returning to a's image,
    c->a being b->a itself, or c and d the same atom image.
    """
    a, b = qint.receivers, qint.senders
    u_db, s_d, sh_db, m_db = jax.tree.map(lambda x: x[b], main)   # (Q, K, ...) main slots of b: d->b
    u_ca, s_c, sh_ca, m_ca = jax.tree.map(lambda x: x[a], main)   # (Q, K, ...) main slots of a: c->a
    u_ba, s_b, sh_ba = qint_unit[:, None], b[:, None], qint.shift[:, None].astype(sh_db.dtype)  # (Q, 1, ...)
    trip_in = qint.mask[:, None] & m_db & ~same_image(s_d, sh_db, a[:, None], -sh_ba)                   # (Q, K)
    trip_out = qint.mask[:, None] & m_ca & ~same_image(s_c, sh_ca, s_b, sh_ba)                         # (Q, K)
    c_is_d = same_image(s_c[:, :, None], sh_ca[:, :, None], s_d[:, None], sh_db[:, None] + sh_ba[:, None])
    quad = trip_out[:, :, None] & trip_in[:, None] & ~c_is_d                                           # (Q, J, K)
    sph_abd = masked_legendre(jnp.sum(u_ba * u_db, axis=-1), trip_in, num_spherical)
    sph_cab = masked_legendre(jnp.sum(u_ca * u_ba, axis=-1), trip_out, num_spherical)
    normal_out = jnp.cross(u_ca, u_ba)   # (Q, J, 3) plane c-a-b
    normal_in = jnp.cross(u_db, u_ba)    # (Q, K, 3) plane a-b-d
    cos_dihedral = dihedral_cos(normal_out[:, :, None], normal_in[:, None])
    return sph_abd, sph_cab, masked_legendre(cos_dihedral, quad, num_spherical, axis=-2)


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
    """Geometry, raw bases and the shared down-projections (`backbone/bases/...`).

    recompute_embedding: the backward pass recomputes the edge embedding `m` from its inputs instead of
    keeping its intermediates for the whole backward pass (`model.remat="nested"`).
    """

    config: BackboneConfig
    dtype: Any = jnp.float32
    recompute_embedding: bool = False

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

        main = slot_geometry(v_main, graph.senders, graph.edges["shift"], batch.main_slots)
        aeea = slot_geometry(v_ae, batch.a2ee2a.senders, batch.a2ee2a.shift, batch.a2ee2a_slots)
        e2e = TripletBasis(rbf_dense("mlp_rbf_tint", rbf_main), cbf_embedding("mlp_cbf_tint", rbf_main),
                           triplet_sph(main, main, S, same_graph=True))

        # Quadruplets d -> b -> a <- c.
        sph_abd, sph_cab, sph_dihedral = quadruplet_geometry(main, batch.qint, v_qint, S)
        qint = QuadBasis(
            rad=rbf_dense("mlp_rbf_qint", rbf_main),
            cir=jnp.einsum("qcs,qks->qkc", cbf_embedding("mlp_cbf_qint", rbf_qint), sph_abd),
            rad_w1=BasisEmbedding(cfg.emb_size_sbf, S * S, name="mlp_sbf_qint")(rbf_main),
            sph_cab=slot_ops.edges_to_slots(sph_cab, batch.qint_slots), sph_dihedral=sph_dihedral)

        # Atom -> edge: a2ee2a edge b->a into main edge c->a; edge -> atom: main b->a into a2ee2a c->a.
        # Both pair the same slots of the two graphs, so they share one angular basis (transposed).
        sph_a2e = triplet_sph(main, aeea, S, same_graph=False)
        a2e = TripletBasis(rbf_dense("mlp_rbf_aeint", rbf_ae), cbf_embedding("mlp_cbf_aeint", rbf_main), sph_a2e)
        e2a = TripletBasis(rbf_dense("mlp_rbf_eaint", rbf_main), cbf_embedding("mlp_cbf_eaint", rbf_ae),
                           jnp.swapaxes(sph_a2e, 1, 2))
        a2a_rad = BasisEmbedding(cfg.emb_size_rbf, name="mlp_rbf_aint")(rbf_aa)

        atom_update = rbf_dense("mlp_rbf_h", rbf_main)
        output = rbf_dense("mlp_rbf_out", rbf_main)
        edge_emb = EdgeEmbedding(cfg.emb_size_edge, dtype=self.dtype, name="edge_emb")
        embed_inputs = (h, rbf_main, graph.senders, graph.receivers)
        m = recomputed_in_backward(edge_emb, *embed_inputs) if self.recompute_embedding else edge_emb(*embed_inputs)
        return BasesOutput(m, atom_update, output, e2e, qint, a2e, e2a, a2a_rad, v_main, d_main)
