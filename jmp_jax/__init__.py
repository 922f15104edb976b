"""jmp_jax: JAX/Flax GemNet-OC and JMP. `load_pretrained` is imported lazily (it pulls in JAX and Flax)."""
from __future__ import annotations

from jmp_jax.host_memory import retain_freed_host_memory

# Whether freed host memory is kept in the process (see jmp_jax/host_memory.py); benches report it.
host_memory_retained = retain_freed_host_memory()

__all__ = ["load_pretrained", "PretrainedModel", "FinetunedModel"]


def __getattr__(name: str):
    if name in __all__:
        from jmp_jax import pretrained
        return getattr(pretrained, name)
    raise AttributeError(f"module 'jmp_jax' has no attribute {name!r}")
