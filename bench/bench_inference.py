r"""Inference latency of `PretrainedModel.predict` and of the ase calculator, as the steps of an MD run see it.

  python bench/bench_inference.py                                       # JMP-S (random weights), float32
  python bench/bench_inference.py --config demo --calls 1 --no-report   # the smoke test

One 20-atom molecule (n-hexane, no PBC, 8 Å, head ani1x) and one 66-atom slab (Cu(111) 4x4x4 with CO,
OC20 tags, 12 Å with PBC, head oc20), each with the head's direct forces and with gradient forces
(-dE/dpos, energy-conserving: what MD and relaxations should use). Per case: the first calculator call
(graph building, tracing and compiling, running), then medians over `--calls` calls, each after moving
every atom by a random ~0.01 Å from the start as consecutive MD steps do: the calculator
(`atoms.get_forces()`), `predict` on the same atoms, and the host graph building alone (part of both), each
over the calls that compiled nothing; and how many moved calls compiled a new program (a new padded shape).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from ase import Atoms  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_model import alkane, cu_slab  # noqa: E402
from jmp_jax.ase_calculator import JMPCalculator  # noqa: E402
from jmp_jax.models import config as config_lib  # noqa: E402
from jmp_jax.models.jmp import JMPModel  # noqa: E402
from jmp_jax.pretrained import FORCE_MODES, PretrainedModel, build_graphs, jmp_pretrain_tasks  # noqa: E402
from jmp_jax.training.state import init_variables  # noqa: E402

# name: (structure, head)
STRUCTURES = {"molecule": (lambda: alkane(6, 0), "ani1x"), "slab": (lambda: cu_slab("CO", 0), "oc20")}
STEP_ANGSTROM = 0.01  # random displacement per atom and axis from the start positions, per call


def random_pretrained(size: str) -> PretrainedModel:
    """A JMP checkpoint's model with random weights: JMP's four heads, JMP's fitted scale factors for its sizes."""
    config = config_lib.NAMED_CONFIGS[size]()
    tasks = jmp_pretrain_tasks()
    variables = init_variables(JMPModel(config, num_tasks=len(tasks)), 0,
                               "fitted" if size in ("jmp_s", "jmp_l") else "none", size)
    return PretrainedModel(config, variables, tasks)


def bench_case(model: PretrainedModel, name: str, atoms: Atoms, head: str, forces: str, calls: int) -> list:
    rng = np.random.default_rng(0)
    start = atoms.positions.copy()

    def moved_calls(call) -> tuple[float, int, float]:
        """(median ms of the calls that compiled nothing, calls that compiled, their total s)."""
        plain, compiling = [], []
        for _ in range(calls):
            atoms.positions = start + rng.normal(scale=STEP_ANGSTROM, size=start.shape)
            compiles = model.num_compiles
            t0 = time.perf_counter()
            call()
            (plain if model.num_compiles == compiles else compiling).append(time.perf_counter() - t0)
        return (1e3 * statistics.median(plain) if plain else float("nan")), len(compiling), sum(compiling)

    atoms.calc = JMPCalculator(model, head, forces=forces)
    common.stage(f"{name}, {forces} forces: first call")
    t0 = time.perf_counter()
    atoms.get_forces()
    first_s = time.perf_counter() - t0
    common.stage(f"{name}, {forces} forces: {calls} moved calls each")
    calculator_ms, calculator_compiles, calculator_compile_s = moved_calls(atoms.get_forces)
    predict_ms, predict_compiles, predict_compile_s = moved_calls(
        lambda: model.predict([atoms], head, forces=forces, batch_size=1))
    graphs_ms, _, _ = moved_calls(lambda: build_graphs([atoms]))
    compiles, compile_s = calculator_compiles + predict_compiles, calculator_compile_s + predict_compile_s
    return [name, len(atoms), head, forces, f"{first_s:.1f}", f"{calculator_ms:.0f}", f"{predict_ms:.0f}",
            f"{graphs_ms:.1f}", f"{1e3 / calculator_ms:.2f}", f"{compiles} of {2 * calls}" + (
                f" ({compile_s:.0f} s)" if compiles else "")]


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jmp_s", choices=sorted(config_lib.NAMED_CONFIGS))
    parser.add_argument("--calls", type=int, default=10, help="timed calls per case after the first")
    parser.add_argument("--structures", default=",".join(STRUCTURES), help=f"of {', '.join(STRUCTURES)}")
    parser.add_argument("--forces", default=",".join(FORCE_MODES), help=f"of {', '.join(FORCE_MODES)}")
    parser.add_argument("--no-report", action="store_true", help="print the table only (BENCHMARKS.md untouched)")
    args = parser.parse_args(argv)
    model = random_pretrained(args.config)
    rows = []
    for name in args.structures.split(","):
        make, head = STRUCTURES[name]
        rows += [bench_case(model, name, make(), head, forces, args.calls) for forces in args.forces.split(",")]
    header = ["structure", "atoms", "head", "forces", "first call s (incl. compile)", "calculator ms (MD step)",
              "predict ms", "of which graph building ms", "MD steps/s", "moved calls that compiled (their total)"]
    common.report(f"bench_inference: {args.config} predict and ase-calculator latency (float32)",
                  common.table(header, rows), append=not args.no_report,
                  notes=f"Medians over {args.calls} calls each (calculator, predict, graph building) of those that "
                        f"compiled nothing, each call after a random move of every atom by ~{STEP_ANGSTROM} Å from "
                        f"the start; one structure per call (batch_size=1), random weights; peak RSS of the "
                        f"process {common.peak_rss_mib():.0f} MiB.")


if __name__ == "__main__":
    main()
