"""jmp_jax: JAX/Flax GemNet-OC and JMP. `load_pretrained` is imported lazily (it pulls in JAX and Flax)."""
from __future__ import annotations

from jmp_jax.host_memory import use_one_malloc_arena

# Whether all threads share one malloc arena (see jmp_jax/host_memory.py); benches report it.
one_malloc_arena = use_one_malloc_arena()

__all__ = ["load_pretrained", "PretrainedModel", "FinetunedModel"]


def __getattr__(name: str):
    if name in __all__:
        from jmp_jax import pretrained
        return getattr(pretrained, name)
    raise AttributeError(f"module 'jmp_jax' has no attribute {name!r}")
