r"""Run time of the pre-training optimiser update (the program compiled once per run: AdamW, clipping, EMA and
the non-finite guard over every parameter leaf), state donated as in the training loop.

  python bench/bench_update.py                      # JMP-S and JMP-L
  PYTHONPATH=<checkout of another commit> python bench/bench_update.py --no-report   # that commit's code

The state is JMP-S's (or JMP-L's) initialised variables with fresh optimiser state and EMA; the gradient is
1e-3 x the parameters. Median of 10 calls after one warm-up.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # after PYTHONPATH: see above

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from jmp_jax.models import config as config_lib  # noqa: E402
from jmp_jax.models.jmp import JMPModel, placeholder_batch  # noqa: E402
from jmp_jax.training import optim  # noqa: E402
from jmp_jax.training.state import init_train_state  # noqa: E402
from jmp_jax.training.train_step import train_update  # noqa: E402


def update_ms(name: str, repeats: int = 10) -> tuple[int, float, float]:
    """(parameter leaves, median ms, min ms) of the donated update of model `name`."""
    backbone = config_lib.NAMED_CONFIGS[name]()
    model = JMPModel(backbone, num_tasks=1)
    variables = jax.jit(lambda key: model.init(key, placeholder_batch()))(jax.random.key(0))
    tx, schedule = optim.pretrain_optimizer(variables["params"], num_blocks=backbone.num_blocks, peak_lr=3e-4,
                                            warmup_steps=2000, total_steps=100_000)
    state = jax.jit(functools.partial(init_train_state, tx=tx))(variables)
    grads = jax.tree.map(lambda p: p * 1e-3, state.params)
    update = jax.jit(functools.partial(train_update, tx=tx, schedule=schedule, ema_decay=0.99), donate_argnums=0)
    loss = jnp.float32(1.0)
    state, _ = update(state, loss, grads)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, _ = update(state, loss, grads)
        jax.block_until_ready(state)
        times.append(1000 * (time.perf_counter() - start))
    times.sort()
    return len(jax.tree.leaves(state.params)), times[len(times) // 2], times[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="jmp_s,jmp_l")
    parser.add_argument("--no-report", action="store_true", help="print the table, do not append it")
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        common.stage(f"{name}: initialising and compiling the update")
        leaves, median, fastest = update_ms(name)
        rows.append([name, leaves, f"{median:.0f}", f"{fastest:.0f}"])
    text = common.table(["model", "parameter leaves", "update median ms", "update min ms"], rows)
    common.report("bench_update: the pre-training optimiser update (state donated)", text, append=not args.no_report)


if __name__ == "__main__":
    main()
