"""Embedded default multi-domain pre-training set, built offline from physics that installs from PyPI.

Three domains stand in for JMP's four pre-training sets (docs/jmp_spec.md §3.1), one task each:
- ``catalysis``: rattled ase fcc(111)/(100) slabs with small adsorbates, OC20-style tags/fixed, EMT labels.
- ``molecules``: rattled QM9 molecules (``qm9pack``), GFN2-xTB labels (``tblite``), like ANI-1x.
- ``reactions``: bond-stretch, torsion and H-transfer paths of QM9 molecules, GFN2-xTB labels, like Transition-1x.

Everything is deterministic given ``seed``. Energies are total energies in eV (EMT or GFN2-xTB), forces are
the raw physical forces in eV/Å on every atom (fixed atoms included, as JMP trains on all atoms). The split
metadata written by data_prep.shard_writer.write_split holds the per-element linear reference and spreads.
The default build (1500/1500/1000 structures) took 1.5-2 min on 2 busy CPU cores; ``--small`` ~10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator

from data_prep.synthetic import DefaultDatasetError, catalysis, molecules, reactions

# Bump whenever the recipe or the files' layout changes: it keys the cache, so a changed recipe rebuilds.
# 2: record indexes beside the shards (a new folder: code from before them would take them for shards).
VERSION = "2"
DOMAINS = ("catalysis", "molecules", "reactions")
DEFAULT_SIZES = {"catalysis": 1500, "molecules": 1500, "reactions": 1000}
SMALL_SIZES = {"catalysis": 60, "molecules": 60, "reactions": 48}
# Structures per group (one slab / molecule / path); whole groups go to one split so val is unseen.
GROUP_SIZE = {"catalysis": 3, "molecules": 3, "reactions": 8}
VAL_FRACTION = 0.1
UNITS = {"energy": "eV", "forces": "eV/A", "positions": "A"}
GENERATORS = {
    "catalysis": "ase fcc111/fcc100 slabs + adsorbate, frames of an EMT LBFGS relaxation, rattled; ase EMT labels",
    "molecules": "QM9 (qm9pack==1.0.3) molecules, Gaussian-rattled conformers; GFN2-xTB (tblite) labels",
    "reactions": "QM9 bond stretch / torsion scan / IDPP H-transfer paths; GFN2-xTB (tblite) labels",
}


def _domain_groups(domain: str, count: int, seed: int) -> Iterator[list[dict]]:
    """The endless (or pool-limited) group stream of one domain; tiny builds get smaller groups so that
    there are at least two (train and val)."""
    size = max(1, min(GROUP_SIZE[domain], count // 2))
    if domain == "catalysis":
        return catalysis.catalysis_groups(seed, size)
    pool = molecules.qm9_pool(seed, DOMAINS.index(domain), -(-count // size))
    return (molecules.molecule_groups if domain == "molecules" else reactions.reaction_groups)(seed, size, pool)


def generate_domain(domain: str, count: int, seed: int = 0,
                    on_progress: Callable[[int], None] | None = None) -> dict[str, list[dict]]:
    """Exactly `count` labelled records of one domain as {"train": [...], "val": [...]} (no TF needed).

    Whole groups go to one split; the last ~10% of groups (at least one when there are two) form val.
    """
    if domain not in DOMAINS:
        raise DefaultDatasetError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    if int(count) < 2:
        raise DefaultDatasetError(f"domain {domain!r}: need at least 2 structures (train and val), got {count}")
    groups, total = [], 0
    for group in _domain_groups(domain, count, seed):
        groups.append(group[: count - total])
        total += len(groups[-1])
        if on_progress is not None:
            on_progress(total)
        if total == count:
            break
    else:
        raise DefaultDatasetError(f"domain {domain!r}: ran out of QM9 molecules after {total}/{count} structures")
    n_val = max(1, round(VAL_FRACTION * len(groups)))
    return {"train": [r for g in groups[:-n_val] for r in g], "val": [r for g in groups[-n_val:] for r in g]}


def _progress_printer(domain: str, total: int, enabled: bool) -> Callable[[int], None]:
    """A callback that redraws one stderr line `domain done/total` (newline when complete)."""
    def show(done: int) -> None:
        if enabled:
            end = "\n" if done >= total else ""
            print(f"\r[default dataset] {domain}: {done}/{total}", end=end, file=sys.stderr, flush=True)
    return show


def _resolve_sizes(sizes: dict | None) -> dict[str, int]:
    resolved = dict(DEFAULT_SIZES if sizes is None else sizes)
    unknown = set(resolved) - set(DOMAINS)
    if unknown:
        raise DefaultDatasetError(f"unknown domains {sorted(unknown)} in sizes; expected a subset of {DOMAINS}")
    return {d: int(resolved[d]) for d in DOMAINS if d in resolved}


def build_default_dataset(output_dir: str, *, sizes: dict | None = None, seed: int = 0,
                          progress: bool = True) -> dict:
    """Builds every domain's train/val TFRecord splits into output_dir; returns and writes manifest.json.

    sizes: domain -> number of structures (default DEFAULT_SIZES). Files: <domain>-<split>.tfrecord-* and
    <domain>-<split>.metadata.json (jmp_jax.data.records layout); manifest["splits"][domain][split] is that metadata.
    """
    from data_prep.shard_writer import write_split  # TF is only needed to write

    resolved = _resolve_sizes(sizes)
    manifest = {"version": VERSION, "seed": seed, "sizes": resolved, "units": UNITS, "splits": {}}
    for domain, count in resolved.items():
        splits = generate_domain(domain, count, seed, _progress_printer(domain, count, progress))
        inputs = [] if domain == "catalysis" else molecules.qm9_files()  # catalysis is generated from code
        manifest["splits"][domain] = {
            split: write_split(records, output_dir, domain, split, units=UNITS, source_files=inputs,
                               extra_metadata={"generator": GENERATORS[domain], "default_dataset_version": VERSION})
            for split, records in splits.items()}
    with open(os.path.join(output_dir, "manifest.json"), "w") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
    return manifest


def cache_key(sizes: dict | None = None, seed: int = 0) -> str:
    """Folder name of a cached build: recipe version, seed and sizes."""
    parts = "-".join(f"{domain}{count}" for domain, count in _resolve_sizes(sizes).items())
    return f"v{VERSION}-seed{seed}-{parts}"


def ensure_default_dataset(cache_dir: str | None = None, *, sizes: dict | None = None, seed: int = 0,
                           progress: bool = True) -> str:
    """Path of the cached default dataset, built first if absent.

    cache_dir defaults to $JMP_JAX_DATA, else ~/.cache/jmp_jax/default_dataset. The build goes to a
    temporary sibling folder renamed into place when complete, so an interrupted build leaves no
    half-valid cache entry.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("JMP_JAX_DATA") or os.path.join("~", ".cache", "jmp_jax", "default_dataset")
    cache_dir = os.path.expanduser(cache_dir)
    final = os.path.join(cache_dir, cache_key(sizes, seed))
    if os.path.exists(os.path.join(final, "manifest.json")):
        return final
    os.makedirs(cache_dir, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=f".partial-{os.path.basename(final)}-", dir=cache_dir)
    try:
        build_default_dataset(partial, sizes=sizes, seed=seed, progress=progress)
        os.rename(partial, final)
    except OSError:
        if not os.path.exists(os.path.join(final, "manifest.json")):  # not a concurrent builder winning the rename
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def data_dir_for(config) -> str:
    """A run config's `data.dir`, or, when it is empty, the embedded default dataset of the size
    `data.default_dataset_size` names ("full" or "small"), built once into the cache."""
    if config.data.dir:
        return config.data.dir
    sizes = {"full": DEFAULT_SIZES, "small": SMALL_SIZES}
    if config.data.default_dataset_size not in sizes:
        raise DefaultDatasetError(f"data.default_dataset_size {config.data.default_dataset_size!r} "
                                  f"is not one of {sorted(sizes)}")
    return ensure_default_dataset(sizes=sizes[config.data.default_dataset_size])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True, help="folder for the TFRecord splits and manifest.json")
    parser.add_argument("--small", action="store_true", help=f"a quick build of {SMALL_SIZES}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    manifest = build_default_dataset(args.output, sizes=SMALL_SIZES if args.small else None, seed=args.seed)
    for domain, splits in manifest["splits"].items():
        counts = {split: meta["num_records"] for split, meta in splits.items()}
        print(f"{domain}: {counts}")

if __name__ == "__main__":
    from jmp_jax import cli
    cli.quiet_startup()
    cli.run(main)
