"""Rematerialisation that XLA CPU keeps: a module call whose backward pass recomputes it from its inputs."""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jmp_jax.models import kernels


def recomputed_in_backward(block: nn.Module, *inputs, passed: int = 0, **static) -> Any:
    """block(*inputs[passed:], **static), whose backward pass recomputes the block's forward pass from its
    inputs and variables instead of keeping its intermediates from the forward pass. With `passed` > 0:
    (inputs[:passed], block(*inputs[passed:], **static)).

    A custom VJP rather than `nn.remat`: XLA CPU merges jax.checkpoint's recomputation back into the forward
    pass (see `kernels.after`), which kept every intermediate alive (measured: the JMP-S slab step's
    temporaries 8.4 GiB either way). The block runs as a pure function of its variables, which are passed
    in rather than closed over, so that it also works inside `jax.lax.scan`. `static` holds the call's
    Python (non-array) arguments. Called inside a parent's compact method.

    The recomputation waits for the cotangents of all outputs. An output block's outputs go straight to
    the heads, so their cotangents exist at the start of the backward pass, and XLA ran every output
    block's recomputation there, keeping all their intermediates at once (measured: the JMP-S slab step's
    peak). The `passed` inputs, returned unchanged, make the recomputation wait for their cotangents from
    the layers that read them next, which orders the recomputations.

    The block is traced once per configuration and input shapes (a jitted function keyed by the module
    without its name): the backbone's interaction blocks and its output blocks, all alike, share one trace
    forward and one backward instead of tracing each block twice (XLA inlines the calls).
    """
    if block.is_initializing():
        return _call(block, passed, tuple(static.items()), *inputs)
    variables = {name: tree for name, tree in block.variables.items() if name != "intermediates"}
    # The name is only the parent's key for the variables passed in; without it, equal blocks are equal.
    apply = functools.partial(_apply, block.clone(parent=None, name=None), passed, tuple(sorted(static.items())))
    with jax.named_scope(block.name):  # the block's name in the profile's op names, as without the jit
        return _recomputing(apply)(variables, *inputs)


def _call(block: nn.Module, passed: int, static: tuple, *inputs) -> Any:
    out = block(*inputs[passed:], **dict(static))
    return (inputs[:passed], out) if passed else out


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _apply(block: nn.Module, passed: int, static: tuple, variables: dict, *inputs) -> Any:
    return _call(block.bind(variables), passed, static, *inputs)


def _recomputing(fn: Callable) -> Callable:
    """fn with a VJP that keeps only fn's arguments and recomputes fn in the backward pass."""

    @jax.custom_vjp
    def call(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, cotangent):
        args = kernels.after(args, _every_leaf(cotangent))
        return jax.vjp(fn, *args)[1](cotangent)

    call.defvjp(forward, backward)
    return call


def _every_leaf(tree) -> jax.Array:
    """A float32 scalar that exists only once every non-empty floating leaf of `tree` does (their first
    elements summed)."""
    firsts = [x.reshape(-1)[:1].astype(jnp.float32) for x in jax.tree.leaves(tree)
              if x.size and jnp.issubdtype(x.dtype, jnp.floating)]
    return sum(firsts[1:], firsts[0]) if firsts else jnp.zeros((0,), jnp.float32)
