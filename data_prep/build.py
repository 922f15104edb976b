"""Turns one distributed dataset into TFRecord shards plus metadata.

  python -m data_prep.build --source rmd17 --input rmd17_ethanol.npz --output out/
  python -m data_prep.build --source oc20 --input s2ef_train_2M/ --output out/ --split train
  python -m data_prep.build --source matbench --input matbench_mp_gap.json.gz --output out/ --fold 0

--split names the split an OC20/OC22 input holds; for the other sources it restricts the
output to the listed splits (default: all that the source defines).
"""
from __future__ import annotations

import argparse
import json
import sys

from data_prep import records as records_lib
from data_prep.metadata import InconsistentSplitError
from data_prep.sources import READERS, InputFormatError, SplitPlan

PRE_SPLIT_SOURCES = ("oc20", "oc22")


def select_plans(plans: list[SplitPlan], splits: list[str] | None) -> list[SplitPlan]:
    if not splits:
        return plans
    chosen = [p for p in plans if p.split in splits]
    unknown = set(splits) - {p.split for p in plans}
    if unknown:
        raise InputFormatError(f"splits {sorted(unknown)} not defined; available: {sorted({p.split for p in plans})}")
    return chosen


def build(
    source: str,
    input_path: str | None,
    output_dir: str,
    *,
    splits: list[str] | None = None,
    records_per_shard: int = records_lib.DEFAULT_RECORDS_PER_SHARD,
    **reader_options,
) -> list[dict]:
    """Writes every selected split of one source; returns their metadata dicts."""
    if source not in READERS:
        raise ValueError(f"unknown source {source!r}; choose from {sorted(READERS)}")
    if input_path is None and source != "qm9":
        raise InputFormatError(f"{source}: --input is required")
    if source in PRE_SPLIT_SOURCES:
        if not splits or len(splits) != 1:
            raise InputFormatError(f"{input_path}: {source} input is one distributed split; pass one --split NAME")
        plans = READERS[source](input_path, source=source, split=splits[0], **reader_options)
    else:
        plans = select_plans(READERS[source](input_path, source=source, **reader_options), splits)
    return [
        records_lib.write_split(
            plan.records(), output_dir, plan.name, plan.split,
            records_per_shard=records_per_shard, units=plan.units,
            source_files=plan.source_files, extra_metadata=plan.extra_metadata,
        )
        for plan in plans
    ]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_prep.build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, choices=sorted(READERS))
    parser.add_argument("--input", help="file or folder as distributed (qm9: omit to use the qm9pack package)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--split", nargs="*", help="split name(s); see above")
    parser.add_argument("--records-per-shard", type=int, default=records_lib.DEFAULT_RECORDS_PER_SHARD)
    parser.add_argument("--fold", type=int, nargs="*", help="matbench: folds to write (default all 5)")
    parser.add_argument("--tfds", action="store_true", help="also write TFDS metadata (one source per folder)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    options = {"folds": args.fold} if args.source == "matbench" and args.fold else {}
    try:
        metas = build(args.source, args.input, args.output, splits=args.split,
                      records_per_shard=args.records_per_shard, **options)
    except (InputFormatError, records_lib.RecordError, InconsistentSplitError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for meta in metas:
        print(json.dumps(records_lib.summarize(meta)))
    if args.tfds:
        for meta in metas:
            records_lib.describe_for_tfds(args.output, meta["source"], meta["split"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
