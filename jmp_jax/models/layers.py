"""Primitive GemNet-OC layers (docs/jmp_spec.md §1.2, §1.4) in Flax Linen.

Linen (not NNX) is used throughout the model because its functional params pytree maps one-to-one
onto the PyTorch state_dict names (see `jmp_jax.checkpoint.names`) and feeds jit shardings, optax and
orbax directly, without NNX's split/merge step.

Naming: a torch `ModuleList` entry `name.{i}` becomes the Flax submodule `name_{i}`; a GemNet `Dense`
(`X.linear.weight`, torch (out, in)) becomes module `X` with param `kernel` (in, out).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jmp_jax.models.kernels import batched_matmul, materialize, matmul, vary_alike
from jmp_jax.models.recompute import KEPT_PRODUCT, recomputed_in_backward

INV_SQRT_2 = 1.0 / math.sqrt(2.0)
# A Dense output that `model.remat="products"` keeps for the backward pass: recomputing it costs 2 x width flops
# per float kept, and the narrower products (GemNet's radial and up-projections, 16-64 wide, each as large as
# a wide one's output) cost more memory than they save work (JMP-S slabs: 38% of the bytes that keeping every
# product keeps, for 3% of the recomputation it saves).
KEPT_PRODUCT_MIN_WIDTH = 128


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


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def he_orthogonal_torch_layout(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """GemNet `he_orthogonal_init` for a weight in torch layout.

    2-D (out, in): orthogonal, standardised per row, times 1/sqrt(in).
    3-D (R, S, out): orthogonal on (R, S*out), standardised over axes (0, 1), times 1/sqrt(R*S).
    Compiled once per shape: the model is initialised op by op (`training.state.init_variables`), and run op
    by op this initializer's ~20 operations per weight were most of the init time.
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


def float32_param(module: nn.Module, name: str, init: Any, shape: tuple[int, ...]) -> jax.Array:
    """`module.param(name, init, shape, float32)`; an existing value is returned once its shape is checked.

    Flax checks an existing value's shape by tracing `init` abstractly on every apply. Inside a step's
    shard_map that trace misses the initializer's jit cache, and the orthogonal init (a QR decomposition)
    was about a quarter of tracing a JMP-S training step.
    """
    if not module.has_variable("params", name):
        return module.param(name, init, shape, jnp.float32)
    value = module.get_variable("params", name)
    if value.shape != shape:
        raise flax.errors.ScopeParamShapeError(name, module.scope.path_text, value.shape, shape)
    return value


class Dense(nn.Module):
    """Bias-free GemNet `Dense`: y = act(x @ kernel), kernel (in, out) in float32, compute in `dtype`
    (products as `matmul` sets them).

    x may be a list of arrays, standing for their concatenation along the last axis: each is multiplied by
    its rows of the kernel and the products are summed. The concatenation is never built, nor its cotangent,
    which lives until the backward pass reaches the last part's producer (the force head's input, five blocks'
    edge features: 85 MiB at the JMP-S slab gradient's peak).
    """

    features: int
    activation: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array]) -> jax.Array:
        parts = list(x) if isinstance(x, (list, tuple)) else [x]
        widths = [part.shape[-1] for part in parts]
        kernel = float32_param(self, "kernel", he_orthogonal_kernel, (sum(widths), self.features))
        starts = np.cumsum([0] + widths)
        products = [matmul(part, kernel[start:start + width], self.dtype)
                    for part, start, width in zip(parts, starts, widths)]
        y = sum(products[1:], products[0])
        if kernel.shape[0] >= KEPT_PRODUCT_MIN_WIDTH:
            y = checkpoint_name(y, KEPT_PRODUCT)
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


def residual_stack(x: jax.Array, count: int, prefix: str, dtype: Any, start: int = 0,
                   recompute: bool = False) -> jax.Array:
    """`count` ResidualLayers named `{prefix}_{start + i}` (entries of a torch ModuleList/Sequential).
    `recompute`: each layer keeps only its input for the backward pass (`recomputed_in_backward`).

    Must be called inside a parent's compact method: the layers become the parent's children.
    """
    for i in range(count):
        layer = ResidualLayer(dtype=dtype, name=f"{prefix}_{start + i}")
        x = recomputed_in_backward(layer, x) if recompute else layer(x)
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
            w = float32_param(self, "weight", he_orthogonal_torch_layout, (self.emb_size_interm, num_radial))
            return rbf @ w.T
        w = float32_param(self, "weight", he_orthogonal_torch_layout,
                          (num_radial, self.num_spherical, self.emb_size_interm))
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
