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
import ast
import contextlib
import csv
import ctypes
import functools
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator

import numpy as np
from ase import Atoms
from ase.build import add_adsorbate, fcc100, fcc111
from ase.calculators.calculator import CalculationFailed, InputError
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.data import covalent_radii
from ase.mep import NEB
from ase.optimize import LBFGS

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
QM9_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
GENERATORS = {
    "catalysis": "ase fcc111/fcc100 slabs + adsorbate, frames of an EMT LBFGS relaxation, rattled; ase EMT labels",
    "molecules": "QM9 (qm9pack==1.0.3) molecules, Gaussian-rattled conformers; GFN2-xTB (tblite) labels",
    "reactions": "QM9 bond stretch / torsion scan / IDPP H-transfer paths; GFN2-xTB (tblite) labels",
}

METALS = ("Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al")
SITES = {"fcc111": ("ontop", "bridge", "fcc", "hcp"), "fcc100": ("ontop", "bridge", "hollow")}
VACUUM = 7.0
RELAX_STEPS = 40
# Reaction paths with two atoms closer than this fraction of their covalent-radius sum are dropped
# (0.75 Å for C-H): they gave forces of ~100 eV/Å.
CLASH_FACTOR = 0.7
# Adsorbates EMT can label (H, C, N, O), binding atom first at the origin, pointing up (+z), in Å.
ADSORBATES = {
    "H": ("H", [[0, 0, 0]]), "O": ("O", [[0, 0, 0]]), "C": ("C", [[0, 0, 0]]), "N": ("N", [[0, 0, 0]]),
    "OH": ("OH", [[0, 0, 0], [0, 0, 0.97]]), "CO": ("CO", [[0, 0, 0], [0, 0, 1.15]]),
    "NO": ("NO", [[0, 0, 0], [0, 0, 1.16]]), "CH": ("CH", [[0, 0, 0], [0, 0, 1.09]]),
    "NH": ("NH", [[0, 0, 0], [0, 0, 1.02]]), "CH2": ("CH2", [[0, 0, 0], [0.9, 0, 0.6], [-0.9, 0, 0.6]]),
    "NH2": ("NH2", [[0, 0, 0], [0.82, 0, 0.58], [-0.82, 0, 0.58]]),
    "H2O": ("OH2", [[0, 0, 0], [0.76, 0, 0.59], [-0.76, 0, 0.59]]),
    "CH3": ("CH3", [[0, 0, 0], [1.03, 0, 0.36], [-0.51, 0.89, 0.36], [-0.51, -0.89, 0.36]]),
}


class DefaultDatasetError(ValueError):
    """Bad input to the default-dataset builder (unknown domain, bad size, missing package data)."""


def _record(atoms: Atoms, tags: np.ndarray, fixed: np.ndarray, energy: float, forces: np.ndarray,
            source_id: str) -> dict:
    """One structure as the record dict that data_prep.shard_writer.write_split consumes (N atoms)."""
    return {
        "atomic_numbers": atoms.numbers.astype(np.int64), "positions": atoms.positions.astype(np.float64),
        "cell": np.asarray(atoms.cell[:], np.float64), "pbc": atoms.pbc.astype(bool),
        "tags": tags.astype(np.int64), "fixed": fixed.astype(bool), "energy": float(energy),
        "forces": np.asarray(forces, np.float64), "source_id": source_id,
    }


# ----------------------------------------------------------------------------------------------- catalysis
def _adsorbate(name: str, rng: np.random.Generator) -> Atoms:
    """The adsorbate, randomly spun about z and tilted by up to ~25 degrees about x."""
    symbols, positions = ADSORBATES[name]
    ads = Atoms(symbols, positions=positions)
    ads.rotate(rng.uniform(0.0, 25.0), "x", center=(0, 0, 0))
    ads.rotate(rng.uniform(0.0, 360.0), "z", center=(0, 0, 0))
    return ads


def _random_adslab(rng: np.random.Generator) -> tuple[Atoms, str]:
    """A small fcc slab (ase lattice constant) with one adsorbate near a random site; ase tags 0 = adsorbate,
    1.. = layer."""
    metal, facet = rng.choice(METALS), rng.choice(tuple(SITES))
    width, layers = int(rng.choice([2, 3])), int(rng.choice([3, 4]))
    slab = (fcc111 if facet == "fcc111" else fcc100)(metal, size=(width, width, layers), vacuum=VACUUM)
    name, site = rng.choice(tuple(ADSORBATES)), rng.choice(SITES[facet])
    height = rng.uniform(1.0, 1.6) if name == "H" else rng.uniform(1.2, 2.1)
    offset = rng.integers(0, width, size=2) + rng.uniform(-0.15, 0.15, size=2)
    add_adsorbate(slab, _adsorbate(name, rng), height, position=site, offset=tuple(offset))
    return slab, f"{metal}-{facet}-{width}x{width}x{layers}+{name}@{site}"


def _relaxation_frames(slab: Atoms, fixed: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Positions (N,3) along a short EMT LBFGS relaxation of the slab with its free atoms rattled by 0.05 Å first."""
    atoms = slab.copy()
    atoms.set_constraint(FixAtoms(mask=fixed))
    atoms.positions[~fixed] += rng.normal(scale=0.05, size=(int((~fixed).sum()), 3))
    atoms.calc = EMT()
    return [atoms.positions.copy() for _ in LBFGS(atoms, logfile=None).irun(fmax=0.05, steps=RELAX_STEPS)]


def _catalysis_groups(seed: int, group_size: int) -> Iterator[list[dict]]:
    """Endless adslab groups, OC20 S2EF-like: group_size frames of one EMT relaxation, free atoms rattled again."""
    for system in range(sys.maxsize):
        rng = np.random.default_rng([seed, 0, system])
        slab, label = _random_adslab(rng)
        layer = slab.get_tags()
        tags = np.where(layer == 0, 2, np.where(layer <= 2, 1, 0))  # OC20: adsorbate 2, top two layers 1
        fixed = tags == 0
        trajectory = _relaxation_frames(slab, fixed, rng)
        picks = np.sort(rng.choice(len(trajectory), size=group_size, replace=len(trajectory) < group_size))
        group = []
        for frame in picks:
            atoms = slab.copy()
            atoms.positions = trajectory[frame]
            atoms.positions[~fixed] += rng.normal(scale=rng.uniform(0.0, 0.08), size=(int((~fixed).sum()), 3))
            atoms.set_constraint(FixAtoms(mask=fixed))
            atoms.calc = EMT()
            energy = atoms.get_potential_energy()
            forces = atoms.get_forces(apply_constraint=False)
            group.append(_record(atoms, tags, fixed, energy, forces, f"catalysis/{system:05d}/{label}/step{frame}"))
        yield group


# ------------------------------------------------------------------------------------------------ QM9 + xTB
def _qm9_data_dir() -> str:
    """The qm9pack data folder, found without importing qm9pack (its __init__ needs pkg_resources and pandas)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultDatasetError("package 'qm9pack' not found: pip install qm9pack==1.0.3")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def _source_files(domain: str) -> list[str]:
    """Input files a domain is built from (hashed into the split metadata); catalysis is generated from code."""
    return [] if domain == "catalysis" else [os.path.join(_qm9_data_dir(), name) for name in QM9_FILES]


def _load_qm9(rows: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """QM9 molecules at the given 0-based rows, in that order: (qm9 index, numbers (N,), positions (N,3) Å).

    The CSVs hold one molecule per line, so only the wanted lines go through the (slow) csv parser.
    """
    wanted, found, row = {int(r) for r in rows}, {}, 0
    for name in QM9_FILES:
        path = os.path.join(_qm9_data_dir(), name)
        with open(path, newline="") as handle:
            header = next(csv.reader([handle.readline()]))
            col = {key: header.index(key) for key in ("Index", "Elements", "XYZ_Ang")}
            for line in handle:
                if row in wanted:
                    fields = next(csv.reader([line]))
                    if len(fields) != len(header):
                        raise DefaultDatasetError(f"{path}: molecule row {row} has {len(fields)} fields, "
                                                  f"expected {len(header)}")
                    atoms = Atoms(ast.literal_eval(fields[col["Elements"]]),
                                  positions=json.loads(fields[col["XYZ_Ang"]]))
                    found[row] = (int(fields[col["Index"]]), atoms.numbers, atoms.positions)
                row += 1
    missing = sorted(wanted - set(found))
    if missing:
        raise DefaultDatasetError(f"qm9pack CSVs in {_qm9_data_dir()} lack rows {missing[:5]}")
    return [found[int(r)] for r in rows]


def _qm9_pool(seed: int, domain_id: int, n_groups: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Distinct random QM9 molecules for a domain, with slack for groups dropped on xTB failures."""
    total = 0  # one line per molecule plus a header per file
    for name in QM9_FILES:
        with open(os.path.join(_qm9_data_dir(), name), "rb") as handle:
            total += sum(1 for _ in handle) - 1
    # stream [seed, 10 + domain] cannot coincide with the per-group streams [seed, domain, k]
    rows = np.random.default_rng([seed, 10 + domain_id]).choice(total, size=min(total, int(1.3 * n_groups) + 8),
                                                                replace=False)
    return _load_qm9(rows)


@functools.lru_cache(maxsize=1)
def _gnu_openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime tblite links against (None where there is none, e.g. macOS)."""
    try:
        return ctypes.CDLL("libgomp.so.1")
    except OSError:
        return None


@contextlib.contextmanager
def _one_openmp_thread():
    """Runs the block with one OpenMP thread, then restores the previous count. tblite's threads spin-wait:
    on a busy 2-core machine one thread took 0.03 s per QM9 molecule, two threads 1.3 s (measured)."""
    gomp = _gnu_openmp()
    if gomp is None:
        yield
        return
    previous = gomp.omp_get_max_threads()
    gomp.omp_set_num_threads(1)
    try:
        yield
    finally:
        gomp.omp_set_num_threads(previous)


def xtb_label(numbers: np.ndarray, positions: np.ndarray) -> tuple[float, np.ndarray] | None:
    """GFN2-xTB (tblite) energy (eV) and forces (N,3) eV/Å of a neutral molecule; None if xTB fails."""
    from tblite.ase import TBLite  # imported here so that catalysis-only use needs no tblite

    atoms = Atoms(numbers, positions=positions)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    try:
        with _one_openmp_thread():
            return atoms.get_potential_energy(), atoms.get_forces()
    except (CalculationFailed, InputError):  # SCF failure or a geometry tblite rejects
        return None


def _label_group(numbers, frames, ids) -> list[dict] | None:
    """xTB-label every frame (F,N,3) of one group; None if any frame fails, so the group is dropped whole.

    Molecular records: no PBC, zero cell, all tags 2, nothing fixed (docs/jmp_spec.md §2.2).
    """
    group, n = [], len(numbers)
    for positions, source_id in zip(frames, ids):
        label = xtb_label(numbers, positions)
        if label is None:
            return None
        atoms = Atoms(numbers, positions=positions)
        group.append(_record(atoms, np.full(n, 2), np.zeros(n, bool), *label, source_id))
    return group


def _molecule_groups(seed: int, group_size: int, pool) -> Iterator[list[dict]]:
    """Groups of group_size Gaussian-rattled conformers (sigma 0.02-0.08 Å) of one QM9 molecule."""
    for k, (index, numbers, positions) in enumerate(pool):
        rng = np.random.default_rng([seed, 1, k])
        sigmas = rng.uniform(0.02, 0.08, size=group_size)
        frames = positions + rng.normal(size=(group_size, *positions.shape)) * sigmas[:, None, None]
        group = _label_group(numbers, frames, [f"molecules/qm9_{index:06d}/{c}" for c in range(group_size)])
        if group is not None:
            yield group


# ------------------------------------------------------------------------------------------------ reactions
def _adjacency(numbers: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Covalent bond matrix (N,N) bool: distance below 1.2x the sum of covalent radii."""
    dist = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    radii = covalent_radii[numbers]
    return (dist < 1.2 * (radii[:, None] + radii[None])) & ~np.eye(len(numbers), dtype=bool)


def _side(adjacency: np.ndarray, i: int, j: int) -> np.ndarray | None:
    """Mask (N,) of atoms reachable from j without the bond i-j; None if i is reachable too (ring bond)."""
    graph = adjacency.copy()
    graph[i, j] = graph[j, i] = False
    seen = np.zeros(len(graph), bool)
    seen[j], stack = True, [j]
    while stack:
        for nb in np.flatnonzero(graph[stack.pop()] & ~seen):
            seen[nb] = True
            stack.append(nb)
    return None if seen[i] else seen


def _rotate(points: np.ndarray, origin: np.ndarray, axis: np.ndarray, angle: float) -> np.ndarray:
    """Rodrigues rotation of points (M,3) by angle (rad) about the line origin + t*axis (unit)."""
    rel = points - origin
    cos, sin = np.cos(angle), np.sin(angle)
    return origin + rel * cos + np.cross(axis, rel) * sin + np.outer(rel @ axis, axis) * (1 - cos)


def _clashes(numbers: np.ndarray, frames: np.ndarray) -> bool:
    """Whether any frame (F,N,3) puts two atoms closer than CLASH_FACTOR x their covalent-radius sum."""
    radii = covalent_radii[numbers]
    dist = np.linalg.norm(frames[:, :, None] - frames[:, None], axis=-1) + 1e3 * np.eye(len(numbers))
    return bool(np.any(dist < CLASH_FACTOR * (radii[:, None] + radii[None])))


def _reaction_path(numbers, positions, n_images, rng) -> tuple[str, np.ndarray] | None:
    """One path (n_images,N,3): a bond stretched to dissociation, a torsion scan, or an IDPP H transfer.

    None when the molecule admits no path or the drawn one clashes (a fragment swept through an atom).
    """
    path = _draw_path(numbers, positions, n_images, rng)
    return None if path is None or _clashes(numbers, path[1]) else path


def _draw_path(numbers, positions, n_images, rng) -> tuple[str, np.ndarray] | None:
    """The random path of `_reaction_path`, unchecked."""
    adjacency = _adjacency(numbers, positions)
    splits = []  # (i, j, atoms on j's side) for every directed bond whose removal splits the molecule
    for i, j in np.argwhere(adjacency):
        side = _side(adjacency, int(i), int(j))
        if side is not None:
            splits.append((int(i), int(j), side))
    rotors = [(i, j, side) for i, j, side in splits if 2 <= side.sum() <= len(numbers) - 2]
    near = np.linalg.norm(positions[:, None] - positions[None], axis=-1) < 3.0
    hops = [(int(h), int(a)) for h, a in np.argwhere(near & ~adjacency)
            if numbers[h] == 1 and numbers[a] > 1]  # H to a heavy atom it is not bonded to
    kinds = [kind for kind, ok in (("stretch", splits), ("torsion", rotors), ("htransfer", hops)) if ok]
    if not kinds:
        return None
    kind = kinds[rng.integers(len(kinds))]
    t = np.linspace(0.0, 1.0, n_images)[:, None, None]
    if kind == "stretch":
        i, j, side = splits[rng.integers(len(splits))]
        bond = positions[j] - positions[i]
        shift = (rng.uniform(2.0, 3.0) - 1.0) * bond  # to 2-3x the bond length
        return kind, positions + t * shift * side[:, None]
    if kind == "torsion":
        i, j, side = rotors[rng.integers(len(rotors))]
        axis = (positions[j] - positions[i]) / np.linalg.norm(positions[j] - positions[i])
        total = np.deg2rad(rng.choice([120.0, 180.0]))
        frames = np.repeat(positions[None], n_images, axis=0)
        for k, frac in enumerate(t[:, 0, 0]):
            frames[k, side] = _rotate(positions[side], positions[j], axis, frac * total)
        return kind, frames
    h, acceptor = hops[rng.integers(len(hops))]
    product = positions.copy()
    direction = positions[h] - positions[acceptor]
    product[h] = positions[acceptor] + 1.05 * direction / np.linalg.norm(direction)
    images = [Atoms(numbers, positions=positions + frac * (product - positions)) for frac in t[:, 0, 0]]
    if n_images > 2:  # IDPP relaxes the interior images; it needs at least one
        NEB(images, method="improvedtangent").interpolate("idpp")
    return kind, np.stack([image.positions for image in images])


def _reaction_groups(seed: int, group_size: int, pool) -> Iterator[list[dict]]:
    """Groups of group_size images along one reaction-like path of one QM9 molecule."""
    for k, (index, numbers, positions) in enumerate(pool):
        path = _reaction_path(numbers, positions, group_size, np.random.default_rng([seed, 2, k]))
        if path is None:
            continue
        kind, frames = path
        group = _label_group(numbers, frames, [f"reactions/qm9_{index:06d}/{kind}/{c}" for c in range(group_size)])
        if group is not None:
            yield group


# ------------------------------------------------------------------------------------------------- building
def _domain_groups(domain: str, count: int, seed: int) -> Iterator[list[dict]]:
    """The endless (or pool-limited) group stream of one domain; tiny builds get smaller groups so that
    there are at least two (train and val)."""
    size = max(1, min(GROUP_SIZE[domain], count // 2))
    if domain == "catalysis":
        return _catalysis_groups(seed, size)
    pool = _qm9_pool(seed, DOMAINS.index(domain), -(-count // size))
    return (_molecule_groups if domain == "molecules" else _reaction_groups)(seed, size, pool)


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
        manifest["splits"][domain] = {
            split: write_split(records, output_dir, domain, split, units=UNITS, source_files=_source_files(domain),
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
