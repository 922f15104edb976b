r"""Where the pre-training step's time goes on CPU: XLA's kernels of the gradient and update programs, timed
by a `jax.profiler` trace and grouped by what they compute.

  python bench/bench_profile.py --batches slabs                           # JMP-S, float32
  python bench/bench_profile.py --batches slabs --precision bfloat16      # bf16 matrix products
  python bench/bench_profile.py --batches slabs --by module               # which layer the time is spent in

Each kernel (an XLA thunk: a fusion, a library call, a copy) is put in one group, by default by the
operations of its HLO computation: matrix products (dot or convolution), gathers, scatters, reductions,
copies and transposes, conditionals, and elementwise work (everything else). `--by module` groups by the
model's layer instead (from the op_name jax records for each kernel: the interaction inside an interaction
block, else the backbone's or model's submodule). Kernel seconds are summed over XLA's worker threads, so
they can exceed the step's wall time when kernels run side by side.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import common  # noqa: E402
from bench.bench_compile import BATCHES  # noqa: E402
from bench.bench_model import (pretrain_state, step_programs, timed_compile,  # noqa: E402
                               timed_update_compile)
from jmp_jax.models import config as config_lib  # noqa: E402
from jmp_jax.models.gemnet import REMAT_CHOICES, BlockExecution  # noqa: E402
from jmp_jax.models.jmp import JMPModel  # noqa: E402
from jmp_jax.training.state import SplitStep  # noqa: E402

GROUPS = ("matrix products", "gathers", "scatters", "reductions", "copies and transposes", "conditionals",
          "elementwise")
# The first group whose operation occurs in a kernel's computation names the kernel.
_GROUP_OPS = (("matrix products", ("dot", "convolution")), ("gathers", ("gather", "dynamic-slice")),
              ("scatters", ("scatter", "dynamic-update-slice")), ("reductions", ("reduce", "reduce-window")),
              ("conditionals", ("conditional",)), ("copies and transposes", ("copy", "transpose")))
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*? ([a-z\-]+)\(")
_CALLS = re.compile(r"(?:calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?")


def kernel_groups(hlo_text: str) -> dict[str, str]:
    """{instruction name: group} for every instruction of an optimized HLO module, by the operations in the
    instruction itself or in the computations it calls (transitively)."""
    computations: dict[str, list[str]] = {}
    ops: dict[str, str] = {}
    called: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and "=" not in line.split("{")[0]:
            current = header.group(1)
            computations[current] = []
            continue
        match = _INSTRUCTION.match(line)
        if match and current is not None:
            name, op = match.groups()
            computations[current].append(name)
            ops[name] = op
            calls = _CALLS.search(line)
            called[name] = [c.strip(" %") for c in calls.group(1).split(",")] if calls else []

    def operations(name: str, seen: set) -> set[str]:
        found = {ops[name]}
        for computation in called.get(name, []):
            if computation in seen:
                continue
            seen.add(computation)
            for inner in computations.get(computation, []):
                found |= operations(inner, seen)
        return found

    groups = {}
    for name in ops:
        found = operations(name, set())
        groups[name] = next((g for g, names in _GROUP_OPS if found & set(names)), "elementwise")
    return groups


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def module_of(op_name: str) -> str:
    """The model layer an op_name belongs to, with block numbers elided: the submodule of an interaction
    block ("int_blocks/quad_interaction"), else of the backbone ("bases", "out_blocks") or of the model
    ("output"); "outside the model" for the loss and the optimiser update. jax writes transformed scopes as
    e.g. transpose(jvp(int_blocks_2)), and a recomputed block repeats the path below its own scope, so the
    path after the last "backbone" counts. A recomputed block's path goes on through jit(_apply) and its
    module's class name (`recompute.recomputed_in_backward`); both are dropped."""
    # The last part names the operation, not a module.
    parts = [p.rsplit("(", 1)[-1].rstrip(")") for p in op_name.split("/")[:-1]]
    parts = [p for i, p in enumerate(parts) if p != "_apply" and (i == 0 or parts[i - 1] != "_apply")]
    if "backbone" in parts:
        inner = parts[len(parts) - parts[::-1].index("backbone"):]
    elif "JMPModel" in parts:
        inner = parts[parts.index("JMPModel") + 1:]
    else:
        return "outside the model"
    inner = [re.sub(r"_\d+$", "", p) for p in inner]
    if not inner:
        return "backbone" if "backbone" in parts else "model"
    return "/".join(inner[:2]) if inner[0] == "int_blocks" else inner[0]


def kernel_modules(hlo_text: str) -> dict[str, str]:
    """{instruction name: `module_of` its op_name} for every instruction of an optimized HLO module; "no
    op_name" where jax recorded none (e.g. copies XLA added for layouts)."""
    modules = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            op_name = _OP_NAME.search(line)
            modules[match.group(1)] = module_of(op_name.group(1)) if op_name else "no op_name"
    return modules


def kernel_seconds(trace_dir: str, groups: dict[str, str]) -> tuple[collections.Counter, float]:
    """(seconds per group, seconds of kernels not in `groups`) from the trace's complete events whose name is
    an HLO instruction."""
    path = sorted(glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.trace.json.gz")))[-1]
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    per_group, unknown = collections.Counter(), 0.0
    for event in events:
        if event.get("ph") != "X":
            continue
        name = event["name"]
        if name in groups:
            per_group[groups[name]] += event.get("dur", 0) * 1e-6
        elif re.match(r"^[\w\-]+(\.\d+)?$", name) and ("fusion" in name or name.startswith("wrapped_")):
            unknown += event.get("dur", 0) * 1e-6
    return per_group, unknown


def traced(run, groups: dict[str, str], per_group: collections.Counter) -> tuple[object, float]:
    """(run()'s result, its wall seconds), its kernels' seconds (under a jax.profiler trace) added to per_group
    by `groups`; kernels not found there under "unmatched"."""
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            start = time.perf_counter()
            result = jax.block_until_ready(run())
            wall = time.perf_counter() - start
        seconds, unknown = kernel_seconds(trace_dir, groups)
    per_group.update(seconds)
    per_group["unmatched"] += unknown
    return result, wall


def profile(name: str, backbone: config_lib.BackboneConfig, dtype: str, execution: BlockExecution,
            steps: int, by: str = "kind") -> list[list[str]]:
    batch = BATCHES[name]()
    model = JMPModel(backbone, num_tasks=1, dtype=jnp.dtype(dtype), execution=execution)
    state, tx, schedule = pretrain_state(model)
    gradient, update = step_programs(model, tx, schedule)
    common.stage(f"{name}: compiling")
    gradient_compiled = timed_compile(gradient, state.params, state.constants, batch)[0]
    update_compiled = timed_update_compile(update, gradient, state, batch)[0]
    state, metrics = SplitStep(gradient_compiled, update_compiled)(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    common.stage(f"{name}: profiling {steps} step(s)")
    # Each program in a trace of its own: instruction names repeat across programs.
    grouping = kernel_groups if by == "kind" else kernel_modules
    gradient_groups = grouping(gradient_compiled.as_text())
    update_groups = grouping(update_compiled.as_text())
    per_group, wall = collections.Counter(), 0.0
    for _ in range(steps):
        (loss, _, grads), gradient_s = traced(lambda: gradient_compiled(state.params, state.constants, batch),
                                              gradient_groups, per_group)
        (state, _), update_s = traced(lambda: update_compiled(state, loss, grads), update_groups, per_group)
        wall += (gradient_s + update_s) / steps
    unknown = per_group.pop("unmatched")
    total = sum(per_group.values()) + unknown
    order = GROUPS if by == "kind" else [group for group, _ in per_group.most_common()]
    rows = [[name, group, f"{per_group[group] / steps:.2f}", f"{100 * per_group[group] / total:.0f}%"]
            for group in order]
    rows.append([name, "unmatched kernels", f"{unknown / steps:.2f}", f"{100 * unknown / total:.0f}%"])
    rows.append([name, "all kernels (step wall time)", f"{total / steps:.2f} ({wall:.2f})", "100%"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jmp_s", choices=sorted(config_lib.NAMED_CONFIGS))
    parser.add_argument("--batches", default="slabs")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"),
                        help="jax.default_matmul_precision: bfloat16 products, float32 activations")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the model's compute dtype (bfloat16: bf16 activations)")
    parser.add_argument("--remat", default="block", choices=REMAT_CHOICES, help="model.remat")
    parser.add_argument("--steps", type=int, default=1, help="profiled steps, after one warm-up step")
    parser.add_argument("--by", default="kind", choices=("kind", "module"),
                        help="group kernels by what they compute, or by the model layer they belong to")
    parser.add_argument("--no-report", action="store_true", help="print the table only (BENCHMARKS.md untouched)")
    args = parser.parse_args(argv)
    execution = BlockExecution(remat=args.remat)
    with jax.default_matmul_precision(args.precision):
        rows = [row for name in args.batches.split(",")
                for row in profile(name, config_lib.NAMED_CONFIGS[args.config](), args.dtype, execution, args.steps,
                                   args.by)]
    table = common.table(["batch", "kernels" if args.by == "kind" else "layer",
                          "kernel s per step (summed over threads)", "share"], rows)
    title = (f"bench_profile: {args.config} training step by {args.by} ({args.dtype} compute, {args.precision} "
             f"products, remat {args.remat})")
    common.report(title, table, append=not args.no_report)


if __name__ == "__main__":
    main()
