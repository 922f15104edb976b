r"""Forward and training-step speed of the full JMP-S model on CPU-sized batches.

  python bench/bench_model.py                       # JMP-S, both batches, float32
  python bench/bench_model.py --precision bfloat16  # bf16 matrix-product operands, float32 elsewhere
  python bench/bench_model.py --dtype bfloat16      # bf16 compute (float32 params, bases and sums)
  python bench/bench_model.py --config demo         # the narrow fixture model
  python bench/bench_model.py --scan                # one scanned interaction block (model.scan_blocks)
  python bench/bench_model.py --remat none          # blocks not recomputed in the backward pass (model.remat)

Batches: (a) 8 rattled n-heptane molecules (23 atoms, 8 Å, no PBC) and (b) 4 Cu(111) 4x4x4 slabs
with a CO or OH adsorbate (12 Å, PBC), built with JMP's pre-training graph settings. The training
step is the real pre-training step (AdamW, energy L1 + structure-wise force L2, EMA).
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from ase import Atoms  # noqa: E402
from ase.build import add_adsorbate, fcc111, molecule  # noqa: E402

import jmp_jax  # noqa: E402
from bench import common  # noqa: E402
from jmp_jax import program_store  # noqa: E402
from jmp_jax.graph import batching  # noqa: E402
from jmp_jax.graph.build import GraphSettings, build_from_atoms  # noqa: E402
from jmp_jax.models import config as config_lib  # noqa: E402
from jmp_jax.models.gemnet import REMAT_CHOICES, BlockExecution  # noqa: E402
from jmp_jax.models.jmp import JMPModel  # noqa: E402
from jmp_jax.training import optim  # noqa: E402
from jmp_jax.data.types import TaskNormalization  # noqa: E402
from jmp_jax.data.types import LabeledBatch
from jmp_jax.training.state import SplitStep, TrainState, init_train_state, init_variables  # noqa: E402
from jmp_jax.training.train_step import train_loss_and_gradient, train_update  # noqa: E402


def alkane(carbons: int, seed: int) -> Atoms:
    """n-alkane C_nH_(2n+2) (n >= 2; heptane: 23 atoms, hexane: 20): a zig-zag carbon chain with tetrahedral
    hydrogens, rattled."""
    cc, ch, half = 1.54, 1.09, np.deg2rad(109.5) / 2
    # Carbons 1..n plus virtual continuations 0 and n+1, which mark where the end methyls' third H goes.
    chain = np.array([[i * cc * np.sin(half), (i % 2) * cc * np.cos(half), 0.0] for i in range(-1, carbons + 1)])
    z = np.array([0.0, 0.0, 1.0])
    hydrogens = []
    for i in range(1, carbons + 1):
        c, prev, nxt = chain[i], chain[i - 1], chain[i + 1]
        away = -((prev - c) / cc + (nxt - c) / cc)
        away /= np.linalg.norm(away)
        hydrogens += [c + ch * (np.cos(half) * away + s * np.sin(half) * z) for s in (-1.0, 1.0)]
        if i in (1, carbons):
            hydrogens.append(c + ch * ((prev if i == 1 else nxt) - c) / cc)
    atoms = Atoms(f"C{carbons}H{2 * carbons + 2}", positions=np.vstack([chain[1:carbons + 1], hydrogens]))
    atoms.rattle(0.02, seed=seed)
    return atoms


def cu_slab(adsorbate: str, seed: int) -> Atoms:
    slab = fcc111("Cu", size=(4, 4, 4), vacuum=10.0)
    tags = np.where(slab.get_tags() <= 2, 1, 0)  # ase tags layers from the top: two top layers are surface
    slab.set_tags(tags)
    add_adsorbate(slab, molecule(adsorbate), height=1.9, position="ontop")
    slab.set_tags(np.concatenate([tags, np.full(len(slab) - len(tags), 2)]))
    slab.rattle(0.03, seed=seed)
    slab.pbc = True
    return slab


def make_batch(structures, settings: GraphSettings) -> LabeledBatch:
    graphs = [build_from_atoms(a, settings) for a in structures]
    budgets = batching.budgets_for(graphs)
    graph_batch = batching.collate(graphs, budgets)
    rng = np.random.default_rng(0)
    energy = np.zeros(budgets.graphs, np.float32)
    energy[:len(structures)] = rng.normal(size=len(structures))
    forces = rng.normal(size=(budgets.nodes, 3)).astype(np.float32)
    one = LabeledBatch(graphs=graph_batch, energy=energy, forces=forces)
    return jax.tree.map(lambda x: np.asarray(x)[None], one)  # one batch shard


def pretrain_state(model: JMPModel) -> tuple[TrainState, optax.GradientTransformation, Any]:
    """(initialised training state, optimiser, learning-rate schedule) of `model` as JMP pre-trains it (AdamW,
    warm-up then cosine), its variables random and initialised as the training loops do."""
    variables = init_variables(model, seed=0, scale_factors="none", backbone_name="")
    tx, schedule = optim.pretrain_optimizer(variables["params"], num_blocks=model.config.num_blocks, peak_lr=3e-4,
                                            warmup_steps=2000, total_steps=100_000)
    return jax.jit(functools.partial(init_train_state, tx=tx))(variables), tx, schedule


def step_programs(model: JMPModel, tx, schedule, task: int = 0,
                  norm: TaskNormalization = TaskNormalization(1.0, 1.0, 1.0, 10.0), optimizer_key=None) -> tuple:
    """The pre-training step's two jitted halves as the training loop runs them (`state.SplitStep`): the
    gradient, compiled per batch shape, and the update (state donated), compiled once.

    optimizer_key: a description of `tx` and `schedule` (their settings); given, the halves go through the
    traced-program store when it is on (`jmp_jax.program_store`), as in the loops.
    """
    gradient = functools.partial(train_loss_and_gradient, model=model, task=task, norm=norm)
    update = functools.partial(train_update, tx=tx, schedule=schedule, ema_decay=0.99)
    if optimizer_key is None:
        return jax.jit(gradient), jax.jit(update, donate_argnums=0)
    return (program_store.jit(gradient, name="bench_gradient", key=(repr(model), task, norm)),
            program_store.jit(update, name="bench_update", key=(repr(model), optimizer_key), donate_argnums=0))


def timed(stage: Callable[[], object]) -> tuple[object, float, float]:
    """(stage(), wall s, CPU s of this process); CPU time shows a compile's own cost on a machine shared
    with other work."""
    t0, c0 = time.perf_counter(), time.process_time()
    result = stage()
    return result, time.perf_counter() - t0, time.process_time() - c0


def timed_compile(lowerable, *args) -> tuple[jax.stages.Compiled, float, float]:
    """(compiled, wall s, CPU s) of lowering and compiling."""
    return timed(lambda: lowerable.lower(*args).compile())


def timed_update_compile(update, gradient, state, *inputs, update_inputs: tuple = ()):
    """(compiled, wall s, CPU s) of the update program for the outputs of `gradient` on `inputs`; the
    gradient itself is only traced (shapes), not compiled."""
    loss, _, grads = jax.eval_shape(gradient, state.params, state.constants, *inputs)
    return timed_compile(update, state, loss, grads, *update_inputs)


def bench_batch(name: str, batch: LabeledBatch, backbone: config_lib.BackboneConfig, repeats: int, peak: float,
                dtype: str, execution: BlockExecution):
    common.stage(f"{name}: initialising")
    model = JMPModel(backbone, num_tasks=1, dtype=jnp.dtype(dtype), execution=execution)
    shard = jax.tree.map(lambda x: x[0], batch.graphs)
    state, tx, schedule = pretrain_state(model)
    variables = {"params": state.params, "constants": state.constants}  # for the forward, before any donation
    n_atoms = int(batch.graphs.graph.nodes["mask"].sum())

    common.stage(f"{name}: compiling the forward pass")
    forward = jax.jit(lambda v, g: model.apply(v, g)["energy"])
    forward_compiled, forward_compile_s, forward_compile_cpu = timed_compile(forward, variables, shard)
    forward_compiled(variables, shard).block_until_ready()
    fwd_ms = common.median_ms(lambda: forward_compiled(variables, shard).block_until_ready(), repeats)

    common.stage(f"{name}: forward {fwd_ms:.0f} ms; compiling the training step")
    gradient, update = step_programs(model, tx, schedule)
    gradient_compiled, gradient_compile_s, gradient_compile_cpu = timed_compile(
        gradient, state.params, state.constants, batch)
    update_compiled, update_compile_s, update_compile_cpu = timed_update_compile(update, gradient, state, batch)
    step_compiled = SplitStep(gradient_compiled, update_compiled)
    step_flops = sum(c.cost_analysis().get("flops", float("nan")) for c in (gradient_compiled, update_compiled))
    state, metrics = step_compiled(state, batch)
    jax.block_until_ready(metrics)

    def one_step():
        nonlocal state
        state, m = step_compiled(state, batch)
        jax.block_until_ready(m)

    common.stage(f"{name}: timing the training step")
    faults_before, cpu_before = common.minor_page_faults(), time.process_time()
    step_ms = common.median_ms(one_step, repeats)
    step_cpu_s = (time.process_time() - cpu_before) / repeats
    faults_per_step = (common.minor_page_faults() - faults_before) / repeats
    return [name, n_atoms, f"{fwd_ms:.0f}", f"{step_ms:.0f}", f"{step_cpu_s:.1f}", f"{n_atoms / step_ms * 1e3:.0f}",
            f"{forward_compile_s:.1f} + {gradient_compile_s:.1f} + {update_compile_s:.1f}",
            f"{forward_compile_cpu:.1f} + {gradient_compile_cpu:.1f} + {update_compile_cpu:.1f}",
            f"{step_flops / 1e9:.0f}",
            f"{step_flops / (step_ms * 1e-3) / 1e9:.0f} ({100 * step_flops / (step_ms * 1e-3) / 1e9 / peak:.0f}%)",
            f"{faults_per_step:.0f}", f"{common.peak_rss_mib():.0f}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jmp_s", choices=sorted(config_lib.NAMED_CONFIGS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", default="molecules,slabs")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of the model (parameters stay float32)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                        help="jax.default_matmul_precision: bfloat16 rounds the operands of the model's matrix "
                             "products to bfloat16 (float32 accumulation); activations stay in --dtype")
    parser.add_argument("--scan", action="store_true", help="one scanned interaction block instead of unrolled ones")
    parser.add_argument("--remat", default="block", choices=REMAT_CHOICES, help="model.remat")
    args = parser.parse_args()
    execution = BlockExecution(scan=args.scan, remat=args.remat)
    backbone = config_lib.NAMED_CONFIGS[args.config]()
    peak = common.matmul_gflops(dtype=jnp.dtype(args.precision))
    batches = {
        "molecules": lambda: make_batch([alkane(7, s) for s in range(8)], GraphSettings.pretrain_molecule()),
        "slabs": lambda: make_batch([cu_slab("CO" if s % 2 == 0 else "OH", s) for s in range(4)],
                                    GraphSettings.pretrain_periodic()),
    }
    with jax.default_matmul_precision(args.precision):
        rows = [bench_batch(name, batches[name](), backbone, args.repeats, peak, args.dtype, execution)
                for name in args.batches.split(",")]
    header = ["batch", "atoms", "forward ms", "train step ms", "train step CPU s", "atoms/s (train)",
              "compile s (forward + gradient + update)",
              "compile CPU s (forward + gradient + update)",
              "step GFLOP (XLA)", "step GFLOP/s (% of matmul peak)", "page faults / step", "peak RSS MiB"]
    blocks = f"{'scanned' if args.scan else 'unrolled'} blocks, remat {args.remat}"
    common.report(f"bench_model: {args.config} ({args.dtype}, {args.precision} products, {blocks}) forward and "
                  f"training step",
                  common.table(header, rows),
                  notes=f"Measured {args.precision} matmul rate of this machine through XLA (float32 "
                        f"accumulation), the peak in the table: {peak:.0f} GFLOP/s. "
                        f"Median of {args.repeats} steps after one warm-up step. One malloc arena for all "
                        f"threads (jmp_jax/host_memory.py): {'yes' if jmp_jax.one_malloc_arena else 'no'}.")


if __name__ == "__main__":
    main()
