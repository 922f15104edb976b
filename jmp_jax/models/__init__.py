"""GemNet-OC and JMP in Flax. Importing the package hands the heap's free pages back to the system after
each long XLA compile (`host_memory.trim_after_compiles`): every program that compiles a model does that."""
from jmp_jax.host_memory import trim_after_compiles

trim_after_compiles()
