"""Turns one distributed dataset into TFRecord shards plus metadata.

  python -m data_prep.build --source rmd17 --input rmd17_ethanol.npz --output out/
  python -m data_prep.build --source oc20 --input s2ef_train_2M/ --output out/ --split train
  python -m data_prep.build --source matbench --input matbench_mp_gap.json.gz --output out/ --fold 0
  python -m data_prep.build --source rmd17 --input rmd17/npz_data/rmd17_ethanol.npz --output out/ --fold 1

--split names the split an OC20/OC22 input holds; for the other sources it restricts the
output to the listed splits (default: all that the source defines).

--energy-kind (oc20/oc22 LMDB input): which energy the LMDB holds; see data_prep/sources/ocp_lmdb.py.

--fold: matbench: the folds to write (0..4, default all). rmd17: one official fold K (1..5) of
a full rmd17_<molecule>.npz, read from the release's index_{train,test}_0K.csv in ../splits
beside the npz's folder (or --splits-dir DIR): train (all but 50) and val (50, by JMP's seed-42
shuffle of the train file's positions) from the train indices, test from the test indices.
Without --fold a full rMD17 file gets JMP's own split (seed 42: 950 train, 50 val, rest test).

--max-records N: only the first N records of each split (in the split's order; a quick look or a test),
noted as "max_records" in its metadata.

--workers N / --runner NAME: build on Apache Beam (data_prep/beam_build.py; pip install -e .[beam]),
same files, same bytes.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys

from jmp_jax import cli

cli.quiet_startup()  # before TensorFlow loads (data_prep.shard_writer)

from data_prep import shard_writer  # noqa: E402
from jmp_jax.data import records as records_lib  # noqa: E402
from jmp_jax.data.metadata import ENERGY_KINDS, InconsistentSplitError  # noqa: E402
from data_prep.sources import READERS, InputFormatError, SplitPlan  # noqa: E402

PRE_SPLIT_SOURCES = ("oc20", "oc22")


def select_plans(plans: list[SplitPlan], splits: list[str] | None) -> list[SplitPlan]:
    if not splits:
        return plans
    chosen = [p for p in plans if p.split in splits]
    unknown = set(splits) - {p.split for p in plans}
    if unknown:
        raise InputFormatError(f"splits {sorted(unknown)} not defined; available: {sorted({p.split for p in plans})}")
    return chosen


def plan_splits(source: str, input_path: str | None, splits: list[str] | None = None,
                **reader_options) -> list[SplitPlan]:
    """The SplitPlans of every selected split of one source (see `build`)."""
    if source not in READERS:
        raise ValueError(f"unknown source {source!r}; choose from {sorted(READERS)}")
    if input_path is None and source != "qm9":
        raise InputFormatError(f"{source}: --input is required")
    if source in PRE_SPLIT_SOURCES:
        if not splits or len(splits) != 1:
            raise InputFormatError(f"{input_path}: {source} input is one distributed split; pass one --split NAME")
        return READERS[source](input_path, source=source, split=splits[0], **reader_options)
    return select_plans(READERS[source](input_path, source=source, **reader_options), splits)


def write_options(plan: SplitPlan) -> dict:
    """The metadata arguments of records.write_split / commit_split for one plan."""
    return {"units": plan.units, "source_files": plan.source_files, "extra_metadata": plan.extra_metadata,
            "energy_kind": plan.energy_kind}


def build(
    source: str,
    input_path: str | None,
    output_dir: str,
    *,
    splits: list[str] | None = None,
    records_per_shard: int = shard_writer.DEFAULT_RECORDS_PER_SHARD,
    max_records: int | None = None,
    **reader_options,
) -> list[dict]:
    """Writes every selected split of one source (its first max_records records when set); returns their
    metadata dicts."""
    metas = []
    for plan in plan_splits(source, input_path, splits, **reader_options):
        options = write_options(plan)
        stream = plan.records()
        if max_records is not None:
            stream = itertools.islice(stream, max_records)
            options["extra_metadata"] = {**(options["extra_metadata"] or {}), "max_records": max_records}
        metas.append(shard_writer.write_split(stream, output_dir, plan.name, plan.split,
                                              records_per_shard=records_per_shard, **options))
    return metas


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(READERS))
    parser.add_argument("--input", help="file or folder as distributed (qm9: omit to use the qm9pack package)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--split", nargs="*", help="split name(s); see above")
    parser.add_argument("--records-per-shard", type=int, default=shard_writer.DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument("--fold", type=int, nargs="*",
                        help="matbench: folds to write (default all 5); rmd17: one official fold 1..5")
    parser.add_argument("--splits-dir", help="rmd17 with --fold: folder of index_{train,test}_0K.csv "
                        "(default: ../splits beside the npz's folder)")
    parser.add_argument("--energy-kind", choices=ENERGY_KINDS,
                        help="oc20/oc22 LMDB input: which energy its graphs hold (default: oc20 referenced, as "
                        "OC20's preprocessing makes them; oc22 total)")
    parser.add_argument("--max-records", type=int, help="only the first N records of each split")
    parser.add_argument("--tfds", action="store_true", help="also write TFDS metadata (one source per folder)")
    parser.add_argument("--workers", type=int, help="build on Apache Beam's DirectRunner with this many processes "
                        "(pip install -e .[beam]); output identical to the default single-process build")
    parser.add_argument("--runner", help="build on this Apache Beam runner (DataflowRunner, FlinkRunner, SparkRunner, "
                        "...); the flags not listed here are passed to it as pipeline options")
    args, pipeline_args = parser.parse_known_args(argv)
    if args.max_records is not None and (args.max_records < 1 or args.workers is not None or args.runner):
        parser.error("--max-records must be >= 1 and applies to the single-process build (no --workers/--runner)")
    if pipeline_args and not args.runner:
        parser.error(f"unrecognized arguments: {' '.join(pipeline_args)} (pipeline options need --runner)")
    args.pipeline_args = pipeline_args
    return args


def reader_options(args: argparse.Namespace) -> dict:
    """The source-specific CLI flags as keyword arguments of the source's reader."""
    if args.splits_dir is not None and args.source != "rmd17":
        raise InputFormatError("--splits-dir applies to --source rmd17 only")
    if args.fold is not None and args.source not in ("matbench", "rmd17"):
        raise InputFormatError("--fold applies to --source matbench and rmd17 only")
    if args.energy_kind is not None and args.source not in PRE_SPLIT_SOURCES:
        raise InputFormatError("--energy-kind applies to --source oc20 and oc22 only")
    if args.source in PRE_SPLIT_SOURCES:
        return {"energy_kind": args.energy_kind} if args.energy_kind else {}
    if args.source == "matbench":
        return {"folds": args.fold} if args.fold else {}
    if args.source == "rmd17":
        if args.fold is not None and len(args.fold) != 1:
            raise InputFormatError(f"rmd17: --fold takes one official fold (1..5), got {args.fold}")
        return {"fold": args.fold[0] if args.fold else None, "splits_dir": args.splits_dir}
    return {}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = reader_options(args)
        run = functools.partial(build, max_records=args.max_records)
        if args.workers is not None or args.runner:
            try:
                from data_prep import beam_build  # optional extra: imports apache_beam
            except ModuleNotFoundError as err:
                if err.name != "apache_beam":
                    raise
                print("error: --workers/--runner build on Apache Beam: pip install -e .[beam]", file=sys.stderr)
                return 2
            run = functools.partial(beam_build.build, workers=args.workers, runner=args.runner,
                                    pipeline_args=args.pipeline_args)
        metas = run(args.source, args.input, args.output, splits=args.split,
                    records_per_shard=args.records_per_shard, **options)
    except (InputFormatError, records_lib.RecordError, InconsistentSplitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for meta in metas:
        print(json.dumps(shard_writer.summarize(meta)))
    if args.tfds:
        for meta in metas:
            shard_writer.describe_for_tfds(args.output, meta["source"], meta["split"])
    return 0


if __name__ == "__main__":
    cli.run(main)
