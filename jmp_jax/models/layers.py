"""Primitive GemNet-OC layers (docs/jmp_spec.md §1.2, §1.4) in Flax Linen.

Linen (not NNX) is used throughout the model because its functional params pytree maps one-to-one
onto the PyTorch state_dict names (see `jmp_jax.checkpoint.names`) and feeds jit shardings, optax and
orbax directly, without NNX's split/merge step.

Naming: a torch `ModuleList` entry `name.{i}` becomes the Flax submodule `name_{i}`; a GemNet `Dense`
(`X.linear.weight`, torch (out, in)) becomes module `X` with param `kernel` (in, out).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def fusion_barrier(x: jax.Array) -> jax.Array:
    """x, computed into its own buffer that every consumer reads (in programs compiled for CPU; identity
    elsewhere).

    XLA's CPU fusion duplicates cheap elementwise producers into each consumer without limit, and it
    expands optimization_barrier before fusing. A conditional is a fusion boundary XLA keeps; both branches
    compute the identity (written differently, or the conditional is dropped as trivial), so it only
    costs a branch on one element. On GPU a conditional would sync with the host, and GPU fusion bounds
    its inputs anyway. The choice follows the platform the program is lowered for, not the host's
    default backend, so a step exported or compiled for GPU/TPU from a CPU host carries no conditional.
    """
    if x.size == 0:
        return x
    return jax.lax.platform_dependent(x, cpu=_conditional_identity, default=lambda y: y)


def _conditional_identity(x: jax.Array) -> jax.Array:
    return jax.lax.cond(jnp.isfinite(x.reshape(-1)[0]), lambda y: y, lambda y: y * 1.0, x)


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
    """Identity whose value and cotangent each go through `fusion_barrier`."""
    return fusion_barrier(x)


def _materialize_fwd(x):
    return fusion_barrier(x), None


def _materialize_bwd(_, ct):
    return (fusion_barrier(ct),)


materialize.defvjp(_materialize_fwd, _materialize_bwd)


def scaled_sum(*terms: jax.Array, scale: float = INV_SQRT_2) -> jax.Array:
    """(sum of terms) * scale, materialised as its own buffer.

    GemNet's residual streams are long chains of such sums. Otherwise XLA fuses the whole chain into
    every consumer and recomputes it from all earlier layers' outputs (measured on CPU: fusions with
    ~100 inputs took more time than the matrix products).
    """
    return materialize(sum(terms[1:], terms[0]) * scale)


def scaled_silu(x: jax.Array) -> jax.Array:
    """SiLU divided by 0.6, GemNet's `ScaledSiLU`."""
    return jax.nn.silu(x) * (1.0 / 0.6)


def he_orthogonal_torch_layout(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """GemNet `he_orthogonal_init` for a weight in torch layout.

    2-D (out, in): orthogonal, standardised per row, times 1/sqrt(in).
    3-D (R, S, out): orthogonal on (R, S*out), standardised over axes (0, 1), times 1/sqrt(R*S).
    """
    flat = (shape[0], math.prod(shape[1:]))
    w = jax.nn.initializers.orthogonal()(key, flat, jnp.float32).reshape(shape)
    axes = (0, 1) if len(shape) == 3 else (1,)
    fan_in = math.prod(shape[:-1]) if len(shape) == 3 else shape[1]
    mean = jnp.mean(w, axis=axes, keepdims=True)
    var = jnp.var(w, axis=axes, keepdims=True, ddof=1)
    w = (w - mean) / jnp.sqrt(var + 1e-6)
    return (w / math.sqrt(fan_in)).astype(dtype)


def he_orthogonal_kernel(key: jax.Array, shape: tuple[int, int], dtype: Any = jnp.float32) -> jax.Array:
    """`he_orthogonal_init` of a torch (out, in) weight, returned as a Flax (in, out) kernel."""
    return he_orthogonal_torch_layout(key, (shape[1], shape[0]), dtype).T


# Values of jax's `default_matmul_precision` that ask for bfloat16 operands with float32 accumulation.
BF16_PRECISIONS = ("bfloat16", "BF16_BF16_F32")


def product_dtype(dtype: Any) -> Any:
    """Operand dtype of the matrix products of a layer computing in `dtype`.

    bfloat16 when computing in it, or when `jax.default_matmul_precision("bfloat16")` is in force:
    TPUs and GPUs honour that setting in their own products, XLA CPU ignores it, so the layers apply it.
    """
    if jax.config.jax_default_matmul_precision in BF16_PRECISIONS:
        return jnp.bfloat16
    return dtype


def transposed_copy(x: jax.Array) -> jax.Array:
    """x (..., M, K) -> (..., K, M), written out as a row-major copy.

    A plain transpose is folded into the product's dimension numbers; XLA CPU runs a product with a
    transposed operand several times slower (bfloat16 2-D: ~4x; float32 batched: a naive loop), and the
    copy costs far less.
    """
    return jnp.swapaxes(x[..., None, :], -3, -1)[..., 0, :]


@jax.custom_vjp
def batched_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """a (B, M, K) @ b (B, K, N) -> (B, M, N), accumulated in float32, in a's dtype.

    Its derivative multiplies row-major copies (see `transposed_copy`), so that every product of the
    backward pass is a batched matmul of the forward's kind.
    """
    return _batched_matmul_fwd(a, b)[0]


def _batched_matmul_fwd(a, b):
    acc = jnp.promote_types(a.dtype, jnp.float32)
    return jnp.matmul(a, b, preferred_element_type=acc).astype(a.dtype), (a, b)


def _batched_matmul_bwd(residuals, ct):
    a, b = residuals
    acc = jnp.promote_types(a.dtype, jnp.float32)
    ct = ct.astype(a.dtype)
    da = jnp.matmul(ct, transposed_copy(b), preferred_element_type=acc)
    db = jnp.matmul(transposed_copy(a), ct, preferred_element_type=acc)
    return da.astype(a.dtype), db.astype(b.dtype)


batched_matmul.defvjp(_batched_matmul_fwd, _batched_matmul_bwd)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (M, K) @ kernel (K, N) -> (M, N) float32, operands rounded to bfloat16, float32 accumulation.

    Its derivative uses the same kind of products, on row-major copies (see `transposed_copy`); jax's
    own derivative of a mixed-precision product leaves the backward products on a slow path on CPU.
    """
    return _bf16_matmul_fwd(x, kernel)[0]


def _bf16_matmul_fwd(x, kernel):
    x16, k16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    residuals = (x16, k16, jnp.zeros((), x.dtype), jnp.zeros((), kernel.dtype))
    return jnp.dot(x16, k16, preferred_element_type=jnp.float32), residuals


def _bf16_matmul_bwd(residuals, ct):
    x16, k16, x_like, kernel_like = residuals
    ct16 = ct.astype(jnp.bfloat16)
    dx = jnp.dot(ct16, transposed_copy(k16), preferred_element_type=jnp.float32)
    if ct.shape[1] < x16.shape[1]:  # transpose the narrower of x and ct (copies cost more than products)
        dk = transposed_copy(jnp.dot(transposed_copy(ct16), x16, preferred_element_type=jnp.float32))
    else:
        dk = jnp.dot(transposed_copy(x16), ct16, preferred_element_type=jnp.float32)
    return dx.astype(x_like.dtype), dk.astype(kernel_like.dtype)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def vary_alike(*xs: jax.Array) -> list[jax.Array]:
    """xs, each made varying over every shard_map axis that any of them varies over.

    A custom VJP must return each cotangent as (non-)varying as its input; a replicated kernel times
    per-shard features has a per-shard cotangent, so the kernel enters as varying and jax's derivative
    of that cast sums the cotangent over the shards.
    """
    axes = [jax.typeof(x).manual_axis_type.varying for x in xs]
    union = frozenset().union(*axes)
    return [jax.lax.pcast(x, tuple(sorted(union - a)), to="varying") if union - a else x for x, a in zip(xs, axes)]


def matmul(x: jax.Array, kernel: jax.Array, dtype: Any) -> jax.Array:
    """x (..., K) @ kernel (K, N) -> (..., N) in `dtype`, with operands in `product_dtype(dtype)`."""
    if product_dtype(dtype) != jnp.bfloat16:
        return jnp.dot(x.astype(dtype), kernel.astype(dtype))
    y = bf16_matmul(*vary_alike(x.reshape(-1, x.shape[-1]), kernel))
    return y.reshape(x.shape[:-1] + (kernel.shape[-1],)).astype(dtype)


def dense_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                      preferred_element_type=None) -> jax.Array:
    """The `dot_general` of a flax `nn.Dense` (contract the last axis of lhs with rhs's first), done by
    `matmul`, so that nn.Dense layers follow the same product precision as `Dense`."""
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or rhs.ndim != 2:
        raise ValueError(f"dense_dot_general only contracts (..., K) with (K, N), got {dimension_numbers}")
    return matmul(lhs, rhs, preferred_element_type or lhs.dtype)


class Dense(nn.Module):
    """Bias-free GemNet `Dense`: y = act(x @ kernel), kernel (in, out) in float32, compute in `dtype`
    (products as `matmul` sets them)."""

    features: int
    activation: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", he_orthogonal_kernel, (x.shape[-1], self.features), jnp.float32)
        y = matmul(x, kernel, self.dtype)
        return scaled_silu(y) if self.activation else y


class ResidualLayer(nn.Module):
    """y = (x + Dense(Dense(x))) / sqrt(2), both Dense with activation; submodules dense_mlp_{0,1}."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        units = x.shape[-1]
        y = Dense(units, activation=True, dtype=self.dtype, name="dense_mlp_0")(x)
        y = Dense(units, activation=True, dtype=self.dtype, name="dense_mlp_1")(y)
        return scaled_sum(x.astype(self.dtype), y)


def residual_stack(x: jax.Array, count: int, prefix: str, dtype: Any, start: int = 0) -> jax.Array:
    """`count` ResidualLayers named `{prefix}_{start + i}` (entries of a torch ModuleList/Sequential).

    Must be called inside a parent's compact method: the layers become the parent's children.
    """
    for i in range(count):
        x = ResidualLayer(dtype=dtype, name=f"{prefix}_{start + i}")(x)
    return x


def dense_then_residuals(x: jax.Array, units: int, count: int, prefix: str, dtype: Any) -> jax.Array:
    """GemNet `get_mlp`: Dense(in -> units, act) only if the width changes, then `count` ResidualLayers.

    Entries are numbered as in the torch ModuleList: with the Dense present it is `{prefix}_0`.
    """
    if x.shape[-1] == units:
        return residual_stack(x, count, prefix, dtype)
    x = Dense(units, activation=True, dtype=dtype, name=f"{prefix}_0")(x)
    return residual_stack(x, count, prefix, dtype, start=1)


class ScaleFactor(nn.Module):
    """Fitted scalar `scale_factor` in the non-trainable `constants` collection; 0 means unfitted (identity)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.variable("constants", "scale_factor", lambda: jnp.zeros((), jnp.float32)).value
        return x * jnp.where(s == 0.0, 1.0, s).astype(x.dtype)


class EdgeEmbedding(nn.Module):
    """m_st = act(W [h_s || h_t || m_st]) (submodule `dense`)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, m: jax.Array, senders: jax.Array, receivers: jax.Array) -> jax.Array:
        x = jnp.concatenate([h[senders], h[receivers], m.astype(h.dtype)], axis=-1)
        return Dense(self.features, activation=True, dtype=self.dtype, name="dense")(x)


class BasisEmbedding(nn.Module):
    """GemNet `BasisEmbedding`: param `weight` kept in torch layout.

    With num_spherical: weight (R, S, interm); returns rad_W1 = (rbf @ W.reshape(R, S*interm)) reshaped
    to (E, interm, S), exactly the reference's (layout-reinterpreting) reshape.
    Without: weight (interm, R); returns rbf @ W.T, shape (E, interm).
    """

    emb_size_interm: int
    num_spherical: int | None = None

    @nn.compact
    def __call__(self, rbf: jax.Array) -> jax.Array:
        num_radial = rbf.shape[-1]
        if self.num_spherical is None:
            w = self.param("weight", he_orthogonal_torch_layout, (self.emb_size_interm, num_radial), jnp.float32)
            return rbf @ w.T
        w = self.param("weight", he_orthogonal_torch_layout,
                       (num_radial, self.num_spherical, self.emb_size_interm), jnp.float32)
        rad_w1 = rbf @ w.reshape(num_radial, -1)
        return rad_w1.reshape(rbf.shape[0], -1, self.num_spherical)


class EfficientBilinear(nn.Module):
    """GemNet `EfficientInteractionBilinear` after the first aggregation (submodule `bilinear`).

    rad_w1 (R, interm, S), sph_m (R, S, in) -> bilinear(vec(rad_w1 @ sph_m)) of shape (R, out); the
    flattening is interm-major as in the reference. With `sum_slots` the inputs are (N, K, ...) and the
    per-slot products are summed over K once more (the e2a edge -> atom step), giving (N, out).
    """

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, rad_w1: jax.Array, sph_m: jax.Array, sum_slots: bool = False) -> jax.Array:
        lead = rad_w1.shape[:-2]  # (R,) or (N, K)
        x = batched_matmul(*vary_alike(rad_w1.reshape((-1,) + rad_w1.shape[-2:]).astype(self.dtype),
                                       sph_m.reshape((-1,) + sph_m.shape[-2:]).astype(self.dtype)))
        x = x.reshape(lead + x.shape[1:])
        if sum_slots:
            x = jnp.sum(x.astype(jnp.promote_types(x.dtype, jnp.float32)), axis=1).astype(self.dtype)
        return Dense(self.features, dtype=self.dtype, name="bilinear")(x.reshape(x.shape[0], -1))
