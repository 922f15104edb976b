r"""Start-up on a multi-million-record split: time from launch to a ready data source and the first
training batch, and host memory per record of the record index.

  python bench/bench_startup.py --records 2000000 5000000 10000000
  python bench/bench_startup.py --records 1000000 --baseline 2edcbb5   # also time that commit's code

One shard of `--records-per-shard` repeated small molecules (energies and forces) is written by
data_prep.shard_writer.write_split (shard + record index); the split is that shard and its index copied to every
shard name, with the metadata's counts raised to match, so generating 10M records takes seconds. Before each
measurement the split's files are written back and dropped from the page cache (posix_fadvise), so the
index is read from disk. Each measurement is a fresh process (`--measure`) that reports, from its launch:
imports done, `task_data.open_source` (the index load), `task_data.load_tasks` (opening + budget planning
on a sample) and the first batch of the training pipeline; and the resident memory the opened source adds.
A training step's compile does not depend on the split's size and is not part of this benchmark.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

LAUNCHED = time.time()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = "bench"
MOLECULES = ("H2O", "NH3", "CH4", "C2H6", "CH3OH", "HCN", "C2H4", "CH3CH2OH")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(data_dir: str) -> dict:
    """Seconds since launch at each stage of start-up, and memory of the opened source (run in a fresh process)."""
    marks = {}
    from configs import pretrain_common
    from jmp_jax.data import records  # noqa: F401 (TensorFlow, which decodes the records: an import, not the load)
    from jmp_jax.data import task_data
    marks["imports"] = time.time() - LAUNCHED
    before = rss_mib()
    t0 = time.time()
    source = task_data.open_source(data_dir, SOURCE, "train")
    marks["open_source"] = time.time() - t0
    marks["open_rss_mib"] = rss_mib() - before
    index = getattr(source, "index", None)  # absent in code before record indexes
    marks["index_bytes"] = (None if index is None else
                            sum(a.nbytes for a in (index.offsets, index.crcs, index.natoms, index.starts)))
    marks["records"] = len(source)
    del source
    config = pretrain_common.pretrain_config("jmp_s")
    config.data.dir = data_dir
    config.data.tasks = [dict(pretrain_common.DEFAULT_TASKS[1], name=SOURCE, source=SOURCE, linear_reference=False)]
    t0 = time.time()
    tasks = task_data.load_tasks(config)
    marks["load_tasks"] = time.time() - t0
    pipe = task_data.make_pipeline(config, tasks, split="train", training=True)
    next(pipe)
    marks["first_batch_since_launch"] = time.time() - LAUNCHED
    pipe.close()
    marks["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return marks


def template(workdir: str, records_per_shard: int) -> str:
    """A folder with one shard (and its index and metadata) of repeated rattled small molecules."""
    import numpy as np
    from ase.build import molecule

    from data_prep import shard_writer
    from jmp_jax.data import records
    out = os.path.join(workdir, "template")
    rng = np.random.default_rng(0)
    shapes = [molecule(name) for name in MOLECULES]
    recs = (records.make_record(a.numbers, a.positions + 0.05 * rng.normal(size=a.positions.shape),
                                source_id=f"m{i}", energy=-float(i % 97), forces=rng.normal(size=(len(a), 3)))
            for i, a in ((i, shapes[i % len(shapes)]) for i in range(records_per_shard)))
    shard_writer.write_split(recs, out, SOURCE, "train", records_per_shard=records_per_shard, units={}, source_files=[])
    return out


def cold_copy(src: str, dst: str) -> None:
    """Copies a file, writes it to disk and drops it from the page cache, so the next read comes from disk."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def split_of(template_dir: str, data_dir: str, num_shards: int, indexed: bool) -> int:
    """The template's shard (and index, if `indexed`) copied to `num_shards` shard names; returns the split's
    record count. Code from before record indexes would take the index files for shards."""
    from jmp_jax.data import record_index, records
    shutil.rmtree(data_dir, ignore_errors=True)
    os.makedirs(data_dir)
    [shard] = records.shard_paths(template_dir, SOURCE, "train")
    meta = records.load_metadata(template_dir, SOURCE, "train")
    prefix = records.split_prefix(data_dir, SOURCE, "train")
    for k in range(num_shards):
        name = f"{prefix}.tfrecord-{k:05d}-of-{num_shards:05d}"
        cold_copy(shard, name)
        if indexed:
            cold_copy(record_index.index_path(shard), record_index.index_path(name))
    meta.update(num_records=meta["num_records"] * num_shards, num_shards=num_shards)
    with open(records.metadata_path(data_dir, SOURCE, "train"), "w") as f:
        json.dump(meta, f)
    return meta["num_records"]


def run_measure(data_dir: str, code_dir: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code_dir, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", data_dir], env=env, cwd=code_dir,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def snapshot(revision: str, workdir: str) -> str:
    """The repository's code at `revision`, extracted to a folder."""
    out = os.path.join(workdir, f"code-{revision}")
    archive = subprocess.run(["git", "archive", revision, "jmp_jax", "data_prep", "configs"], cwd=REPO,
                             capture_output=True, check=True).stdout
    os.makedirs(out)
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        tarfile.open(fileobj=f).extractall(out, filter="data")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[2_000_000])
    parser.add_argument("--records-per-shard", type=int, default=10_000)
    parser.add_argument("--baseline", help="also measure the code of this git revision (e.g. before indexes)")
    parser.add_argument("--baseline-max-records", type=int, default=2_000_000,
                        help="measure the baseline only on splits up to this size (it scans every shard)")
    parser.add_argument("--workdir", default=None, help="where the splits go (default: a temporary folder)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return

    sys.path.insert(0, REPO)
    from bench import common
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_startup-")
    rows = []
    try:
        common.stage("writing the template shard")
        shard_dir = template(workdir, args.records_per_shard)
        codes = [("record indexes (this commit)", REPO, True)]
        if args.baseline:
            codes.append((f"scan + CRC pass ({args.baseline})", snapshot(args.baseline, workdir), False))
        for n in args.records:
            num_shards = -(-n // args.records_per_shard)
            for name, code, indexed in codes if n <= args.baseline_max_records else codes[:1]:
                common.stage(f"{name}: {num_shards} shards of {args.records_per_shard} records")
                data_dir = os.path.join(workdir, "split")
                t0 = time.time()
                total = split_of(shard_dir, data_dir, num_shards, indexed)
                common.stage(f"split written and dropped from the page cache in {time.time() - t0:.0f} s")
                m = run_measure(data_dir, code)
                common.stage(json.dumps(m))
                per_record = "-" if m["index_bytes"] is None else f"{m['index_bytes'] / total:.1f}"
                rows.append([name, f"{total:,}", num_shards, f"{m['imports']:.1f}", f"{m['open_source']:.2f}",
                             per_record, f"{m['open_rss_mib'] * 2**20 / total:.1f}", f"{m['load_tasks']:.1f}",
                             f"{m['first_batch_since_launch']:.1f}",
                             f"{m['first_batch_since_launch'] - m['imports']:.1f}", f"{m['peak_rss_mib']:.0f}"])
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    text = common.table(["code", "records", "shards", "imports s", "open_source s (index load)",
                         "index B/record", "RSS added B/record", "load_tasks s", "launch to first batch s",
                         "of which after imports s", "peak RSS MiB"], rows)
    common.report("bench_startup: launch to first batch on a multi-million-record split", text)


if __name__ == "__main__":
    main()
