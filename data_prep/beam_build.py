"""data_prep.build on Apache Beam (optional: `pip install -e .[beam]`); chosen by build's --workers / --runner.

  python -m data_prep.build --source rmd17 --input rmd17_ethanol.npz --output out/ --workers 4
  python -m data_prep.build --source oc20 --input s2ef/ --split train --output /shared/out \\
      --runner FlinkRunner --flink_master=host:8081 --environment_type=LOOPBACK

Each split is read as one stream (the source readers are sequential) and cut into shards of kept records
as records.write_split does; each shard (one element: its number and its records in order) is encoded,
written and summarised by whichever worker gets it, and a last step merges the shards' statistics in
shard order, as write_split does. Shards and metadata are thus byte-identical to the
single-process build's for any number of workers. Workers write into the output folder: on a cluster it
must be a filesystem that all of them see, and the input must be readable where the split is read.
"""
from __future__ import annotations

import contextlib
import os
import pickle

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from jmp_jax.data import metadata as metadata_lib
from data_prep import shard_writer
from data_prep.build import plan_splits, write_options

SKIPPED = "skipped"
STATS_FILE = "stats.pickle"  # in a split's temporary folder: (merged SplitStats, number of shards)


def pipeline_options(workers: int | None, runner: str | None, pipeline_args: list[str]) -> PipelineOptions:
    """--workers N alone: the DirectRunner with N processes; --runner: that runner with `pipeline_args`."""
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    runner = runner or "DirectRunner"
    args = [f"--runner={runner}", *pipeline_args]
    if workers is not None:
        if runner not in ("DirectRunner", "direct"):
            raise ValueError(f"--workers sets the DirectRunner's processes; size {runner} with its own options")
        args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return PipelineOptions(args)


def _read_shards(_, plan_args: dict, plan_index: int, records_per_shard: int):
    """Reads split `plan_index` of `plan_splits(**plan_args)`: (shard number, its kept records in order) per
    shard; (-1, skip counts) as SKIPPED.

    The worker plans the splits again: a SplitPlan may hold its input's arrays, which Beam would otherwise
    pickle and compress into every copy of this step. One element per shard, not per record: Beam's
    per-element cost is then paid once per shard."""
    plan = plan_splits(**plan_args)[plan_index]
    skips = metadata_lib.SplitStats()
    for shard, shard_records in enumerate(shard_writer.shard_runs(shard_writer.kept_records(plan.records(), skips),
                                                                 records_per_shard)):
        yield shard, list(shard_records)
    yield beam.pvalue.TaggedOutput(SKIPPED, (-1, skips))


def _write_shard(shard_records: tuple[int, list[dict]], tmp_dir: str) -> tuple[int, metadata_lib.SplitStats]:
    shard, in_order = shard_records
    return shard, shard_writer.write_tmp_shard(in_order, tmp_dir, shard)


def _save_merged_stats(keyed_stats: list[tuple[int, metadata_lib.SplitStats]], tmp_dir: str) -> None:
    """Merges the skip counts (key -1) and the shards' statistics in shard order into STATS_FILE."""
    merged = metadata_lib.SplitStats()
    for key, stats in sorted(keyed_stats, key=lambda item: item[0]):
        merged.merge(stats, f"shard {key}")
    with open(os.path.join(tmp_dir, STATS_FILE), "wb") as f:
        pickle.dump((merged, sum(key >= 0 for key, _ in keyed_stats)), f)


def _add_split(pipeline: beam.Pipeline, plan_args: dict, plan_index: int, label: str, tmp_dir: str,
               records_per_shard: int) -> None:
    read = (pipeline
            | f"{label} start" >> beam.Create([None])
            | f"{label} read" >> beam.FlatMap(_read_shards, plan_args, plan_index, records_per_shard)
            .with_outputs(SKIPPED, main="shards"))
    shard_stats = (read.shards
                   | f"{label} spread shards" >> beam.Reshuffle()  # over the workers, away from the reader's
                   | f"{label} write shards" >> beam.Map(_write_shard, tmp_dir))
    _ = ((shard_stats, read[SKIPPED])
         | f"{label} all stats" >> beam.Flatten()
         | f"{label} collect stats" >> beam.combiners.ToList()
         | f"{label} merge stats" >> beam.Map(_save_merged_stats, tmp_dir))


def build(
    source: str,
    input_path: str | None,
    output_dir: str,
    *,
    splits: list[str] | None = None,
    records_per_shard: int = shard_writer.DEFAULT_RECORDS_PER_SHARD,
    workers: int | None = None,
    runner: str | None = None,
    pipeline_args: tuple[str, ...] | list[str] = (),
    **reader_options,
) -> list[dict]:
    """data_prep.build.build as one Beam pipeline over every selected split; returns their metadata dicts."""
    if records_per_shard < 1:
        raise ValueError(f"records_per_shard must be >= 1, got {records_per_shard}")
    options = pipeline_options(workers, runner, list(pipeline_args))
    plan_args = dict(source=source, input_path=input_path, splits=splits, **reader_options)
    plans = plan_splits(**plan_args)
    with contextlib.ExitStack() as stack:
        tmp_dirs = [stack.enter_context(shard_writer.split_tmp_dir(output_dir, p.name, p.split)) for p in plans]
        with beam.Pipeline(options=options) as pipeline:
            for index, (plan, tmp_dir) in enumerate(zip(plans, tmp_dirs)):
                _add_split(pipeline, plan_args, index, f"{plan.name}-{plan.split}", tmp_dir, records_per_shard)
        metas = []
        for plan, tmp_dir in zip(plans, tmp_dirs):
            with open(os.path.join(tmp_dir, STATS_FILE), "rb") as f:
                stats, num_shards = pickle.load(f)
            metas.append(shard_writer.commit_split(tmp_dir, stats, num_shards, output_dir, plan.name, plan.split,
                                                  **write_options(plan)))
        return metas
