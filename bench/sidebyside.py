r"""This project's side of a side-by-side run with the PyTorch reference, and the report of that run.

  bench/sidebyside.sh OUTDIR             # the whole run (reference and project, one process per measurement)
  python bench/sidebyside.py step STRUCTURES.npz --batch slabs --precision float32
  python bench/sidebyside.py report OUTDIR

`step` builds one batch of the reference harness's dumped structures (`bench_reference.py --dump`, in
`../shared/reference/`) with JMP's pre-training graph settings and prints one JSON line: forward and
training-step medians, compile seconds and the peak RSS of the process. `report` reads every measurement
of OUTDIR (the JSON lines and `/usr/bin/time`'s peak RSS) and appends the comparison to BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jmp_jax.models.gemnet import REMAT_CHOICES  # noqa: E402

BATCHES = ("molecules", "slabs")
RUNS = ("ref_f32", "proj_f32", "proj_bf16", "ref_bf16")  # as sidebyside.sh names them
BF16_FLAGS = "--precision bfloat16"  # sidebyside.sh's default project flags for the bf16 rows (PROJECT_BF16)


def load_structures(npz, label: str):
    from ase import Atoms
    structures = []
    for i in range(int(npz[f"{label}.count"])):
        key = f"{label}.{i}."
        atoms = Atoms(numbers=npz[key + "numbers"], positions=npz[key + "positions"], cell=npz[key + "cell"],
                      pbc=npz[key + "pbc"])
        atoms.set_tags(npz[key + "tags"])
        structures.append(atoms)
    return structures


def step(args) -> None:
    import jax
    import numpy as np

    import jmp_jax  # noqa: F401  (the host-memory setting, as a user gets it)
    from bench import bench_model
    from jmp_jax.graph.build import GraphSettings
    from jmp_jax.models import config as config_lib
    from jmp_jax.models.gemnet import BlockExecution

    settings = {"molecules": GraphSettings.pretrain_molecule(), "slabs": GraphSettings.pretrain_periodic()}
    batch = bench_model.make_batch(load_structures(np.load(args.npz), args.batch), settings[args.batch])
    with jax.default_matmul_precision(args.precision):
        row = bench_model.bench_batch(args.batch, batch, config_lib.NAMED_CONFIGS["jmp_s"](), args.repeats, 1.0,
                                      args.dtype, BlockExecution(remat=args.remat))
    forward_compile, gradient_compile, update_compile = (float(s) for s in row[6].split(" + "))
    print("RESULT", json.dumps({"batch": args.batch, "atoms": row[1], "eval_forward_ms": float(row[2]),
                                "train_step_ms": float(row[3]), "forward_compile_s": forward_compile,
                                "gradient_compile_s": gradient_compile, "update_compile_s": update_compile}),
          flush=True)


def read_run(outdir: str, name: str, batch: str) -> dict:
    """The JSON result and the peak RSS (GB) of one measurement; {} where it failed."""
    result = {}
    try:
        with open(os.path.join(outdir, f"{name}.{batch}.log")) as f:
            for line in f:
                if line.startswith("RESULT ") or line.startswith(batch + " {"):
                    result = json.loads(line.split(" ", 1)[1])
        with open(os.path.join(outdir, f"{name}.{batch}.time")) as f:
            fields = f.read().split()
        result["peak_rss_gb"] = int(fields[fields.index("peak_rss_kb") + 1]) / 2**20
    except (OSError, ValueError):
        pass
    return result


def report(args) -> None:
    from bench import common

    def cell(ref: dict, proj: dict, key: str, fmt: str, unit: str, speed: bool) -> str:
        if key not in ref or key not in proj:
            return "failed"
        ratio = ref[key] / proj[key] if speed else proj[key] / ref[key]
        label = f"{ratio:.2f}x" if speed else f"{100 * ratio:.0f}%"
        return f"{ref[key] * fmt:.2f} / {proj[key] * fmt:.2f} {unit} ({label})"

    rows = []
    for batch in BATCHES:
        runs = {name: read_run(args.outdir, name, batch) for name in RUNS}
        if not any(runs.values()):
            continue  # not measured in this run (BATCHES)
        for precision, ref, proj in (("float32", runs["ref_f32"], runs["proj_f32"]),
                                     ("bf16", runs["ref_bf16"], runs["proj_bf16"])):
            if not (ref or proj):
                continue  # not measured in this run (PRECISIONS)
            compile_s = (f"{proj['forward_compile_s']:.0f} + {proj['gradient_compile_s']:.0f} + "
                         f"{proj['update_compile_s']:.0f}" if "gradient_compile_s" in proj else "failed")
            rows.append([batch, precision, proj.get("atoms", "?"),
                         cell(ref, proj, "train_step_ms", 1e-3, "s", True),
                         cell(ref, proj, "eval_forward_ms", 1e-3, "s", True),
                         cell(ref, proj, "peak_rss_gb", 1.0, "GB", False), compile_s])
    header = ["batch", "precision", "atoms", "train step: reference / project (speed-up)",
              "eval forward: reference / project (speed-up)", "peak RSS: reference / project (project's share)",
              "project compile s (forward + gradient + update)"]
    common.report("sidebyside: JMP-S against the PyTorch reference, one process per measurement",
                  common.table(header, rows),
                  notes=f"Run by `bench/sidebyside.sh` (project flags: "
                        f"{os.environ.get('PROJECT_FLAGS') or 'none'}); run folder {args.outdir}. bf16: torch's "
                        f"bfloat16 autocast against this project's `{os.environ.get('PROJECT_BF16') or BF16_FLAGS}` "
                        "(`--precision bfloat16`: bfloat16 matrix products, float32 activations; `--dtype "
                        "bfloat16`: bfloat16 compute). Reference: ../shared/reference/bench_reference.py "
                        "(facebookresearch/JMP @ 937b148, 2 threads, median of "
                        f"{os.environ.get('REF_STEPS', 3)} steps after {os.environ.get('REF_WARMUP', 1)} warm-up); "
                        "project: `bench/sidebyside.py step` (median of 3 "
                        "after 1 warm-up, persistent compilation cache off, so compile times are cold). The "
                        "training step is two programs, as in the training loops: the gradient, compiled per "
                        "batch shape, and the optimiser update, compiled once per run.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("step")
    one.add_argument("npz")
    one.add_argument("--batch", choices=BATCHES, required=True)
    one.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                     help="jax.default_matmul_precision: bfloat16 products, float32 activations")
    one.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                     help="model compute dtype: bfloat16 activations and products (as torch's autocast)")
    one.add_argument("--repeats", type=int, default=3)
    one.add_argument("--remat", default="block", choices=REMAT_CHOICES)
    summary = commands.add_parser("report")
    summary.add_argument("outdir")
    args = parser.parse_args()
    {"step": step, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
