"""Records/s of data_prep.build: the single-process default and Apache Beam's DirectRunner with N processes.

  python bench/bench_build.py --workers 1 2 --tile 20

Builds the rMD17 and OC20 samples in ../shared/data, and the rMD17 one with its frames
repeated --tile times (so that Beam's fixed start-up cost is spread over more records), into a temporary
folder, each way once per repeat (median wall time, Beam's worker start-up included), checks that every
Beam output is byte-identical to the default one, and appends the table to BENCHMARKS.md. Needs the beam
extra (pip install -e .[beam]).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench import common  # noqa: E402
from data_prep import beam_build, build  # noqa: E402

DATA = os.path.join(REPO, "..", "shared", "data")
RMD17_SAMPLE = os.path.join(DATA, "rmd17", "rmd17_ethanol_train_01.npz")


def samples(tmp: str, tile: int) -> dict:
    """{name: (build.build arguments, options)}; the tiled rMD17 sample is written into `tmp`."""
    tiled = os.path.join(tmp, "tiled", os.path.basename(RMD17_SAMPLE))
    os.makedirs(os.path.dirname(tiled))
    with np.load(RMD17_SAMPLE) as sample:
        frames = len(sample["energies"])
        np.savez(tiled, **{key: np.concatenate([value] * tile) if len(value) == frames else value
                           for key, value in sample.items()})
    return {
        "rMD17 ethanol (train npz: train + val)": (("rmd17", RMD17_SAMPLE), {"records_per_shard": 100}),
        f"rMD17 ethanol, frames x{tile}": (("rmd17", tiled), {"records_per_shard": 1000}),
        "OC20 (ASE json + vasprun)": (("oc20", os.path.join(DATA, "oc20")), {"splits": ["train"],
                                                                           "records_per_shard": 1}),
    }


def _files(folder: str) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def timed_build(run, out: str) -> tuple[float, int]:
    """(wall seconds, records written) of one build into the fresh folder `out`."""
    start = time.perf_counter()
    metas = run(out)
    return time.perf_counter() - start, sum(meta["num_records"] for meta in metas)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--tile", type=int, default=20, help="repeats of the rMD17 sample's frames")
    args = parser.parse_args()
    # The DirectRunner's worker processes import data_prep from the environment they inherit.
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ((source, input_path), options) in samples(tmp, args.tile).items():
            ways = {"single process (default)": lambda out: build.build(source, input_path, out, **options)}
            for n in args.workers:
                ways[f"Beam DirectRunner, {n} processes"] = lambda out, n=n: beam_build.build(
                    source, input_path, out, workers=n, **options)
            expected = None
            for way, run in ways.items():
                times = []
                for repeat in range(args.repeats):
                    out = os.path.join(tmp, f"{source}-{len(rows)}-{repeat}")
                    common.stage(f"{name}: {way}")
                    seconds, num_records = timed_build(run, out)
                    times.append(seconds)
                    expected = expected or _files(out)
                    if _files(out) != expected:
                        raise SystemExit(f"{name}: {way} wrote other files than the default build")
                wall = statistics.median(times)
                rows.append([name, way, num_records, f"{wall:.1f}", f"{num_records / wall:.1f}"])
    common.report(
        "bench_build: data_prep.build, single process and on Apache Beam",
        common.table(["sample", "build", "records", "wall s", "records/s"], rows),
        notes="Every Beam output was checked byte-identical to the default build's. Wall time includes Beam's "
              "start of its worker processes (each imports tensorflow), which dominates on the small samples, "
              "and on the tiled one the pickling of every record through Beam's shuffle (one element per "
              "shard).",
    )


if __name__ == "__main__":
    main()
