"""Matrix products and fusion control for the model's hot paths, tuned for XLA CPU.

jax's own einsum/dot derivatives and XLA CPU's fusion choices leave some of GemNet-OC's products and
elementwise chains on slow paths; each function here says which and why, and keeps the same math on
every platform (the CPU-only parts choose by the platform a program is compiled for).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Values of jax's `default_matmul_precision` that ask for bfloat16 operands with float32 accumulation.
BF16_PRECISIONS = ("bfloat16", "BF16_BF16_F32")


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
    return jax.lax.platform_dependent(x, cpu=lambda y: _conditional_identity(y, y.reshape(-1)[0]),
                                      default=lambda y: y)


def _conditional_identity(tree, probe: jax.Array):
    """tree, through a conditional on isfinite(probe) whose branches both return it (written differently, or
    XLA drops the conditional as trivial)."""
    return jax.lax.cond(jnp.isfinite(probe), lambda t: t, lambda t: jax.tree.map(lambda y: y * 1.0, t), tree)


def after(tree, signal: jax.Array):
    """tree, as values that a compiled program can only compute once `signal` exists and cannot merge with
    the same computation on the original tree.

    A backward pass that recomputes a block from its saved inputs passes them through this with the block's
    output cotangent as `signal`: XLA CPU expands `optimization_barrier` before its common-subexpression
    pass, which then merges the recomputation with the forward pass and keeps every intermediate alive
    (jax.checkpoint gains nothing there: measured). On CPU the floating leaves go through a conditional on
    `signal`, a boundary XLA keeps; elsewhere through an optimization barrier shared with `signal`. Integer
    and boolean leaves pass unchanged, and so do leaves that vary over other shard_map axes than `signal`
    (replicated parameters beside per-shard data): a conditional's outputs vary like its predicate.
    """
    if signal.size == 0:
        return tree
    probe = signal.reshape(-1)[0]
    varying = _varying_axes(probe)

    leaves, treedef = jax.tree.flatten(tree)
    tied = [jnp.issubdtype(x.dtype, jnp.floating) and _varying_axes(x) == varying for x in leaves]
    if not any(tied):
        return tree

    def elsewhere(xs, p):
        return jax.lax.optimization_barrier((xs, p))[0]

    chosen = iter(jax.lax.platform_dependent([x for x, t in zip(leaves, tied) if t], probe,
                                             cpu=_conditional_identity, default=elsewhere))
    return jax.tree.unflatten(treedef, [next(chosen) if t else x for x, t in zip(leaves, tied)])


def _varying_axes(x: jax.Array) -> frozenset:
    """The shard_map axes x varies over (empty outside shard_map)."""
    return frozenset(jax.typeof(x).manual_axis_type.varying)


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
    """Identity whose value and cotangent each go through `fusion_barrier`."""
    return fusion_barrier(x)


def _materialize_fwd(x):
    return fusion_barrier(x), None


def _materialize_bwd(_, ct):
    return (fusion_barrier(ct),)


materialize.defvjp(_materialize_fwd, _materialize_bwd)


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

    A plain transpose is folded into the product's dimension numbers. XLA CPU runs a product that
    contracts its left operand's leading axis 2-3x slower in bfloat16 (a weight gradient x^T @ ct), and a
    float32 batched product with a transposed operand as a naive loop; the copy costs far less.
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
    # The copies wait for the cotangent: XLA otherwise made them as soon as the (recomputed) forward pass had,
    # and kept them through the block's backward pass (90 MiB of the JMP-S slab gradient's peak).
    a, b = after(residuals, ct)
    acc = jnp.promote_types(a.dtype, jnp.float32)
    ct = ct.astype(a.dtype)
    da = jnp.matmul(ct, transposed_copy(b), preferred_element_type=acc)
    db = jnp.matmul(transposed_copy(a), ct, preferred_element_type=acc)
    return da.astype(a.dtype), db.astype(b.dtype)


batched_matmul.defvjp(_batched_matmul_fwd, _batched_matmul_bwd)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (M, K) @ kernel (K, N) -> (M, N) float32, operands rounded to bfloat16, float32 accumulation.

    Its derivative is written out: jax's own derivative of a mixed-precision product leaves the backward
    products on a slow path on CPU. The kernel's gradient multiplies a row-major copy of the narrower of x
    and the cotangent (see `transposed_copy`). The input's gradient contracts the kernel in place: as fast
    as on a copy (measured on the JMP-S products), and one copy per layer fewer to compile (328 of the
    JMP-S slab gradient's 4844 fusions; its compile 1-2.5 s shorter, BENCHMARKS.md).
    """
    return _bf16_matmul_fwd(x, kernel)[0]


def _bf16_matmul_fwd(x, kernel):
    x16, k16 = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    residuals = (x16, k16, jnp.zeros((), x.dtype), jnp.zeros((), kernel.dtype))
    return jnp.dot(x16, k16, preferred_element_type=jnp.float32), residuals


def _bf16_matmul_bwd(residuals, ct):
    x16, k16, x_like, kernel_like = residuals
    ct16 = ct.astype(jnp.bfloat16)
    dx = jax.lax.dot_general(ct16, k16, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # ct @ k^T
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
    axes = [_varying_axes(x) for x in xs]
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
