"""Streaming statistics written beside each prepared split (<source>-<split>.metadata.json).

Fields: num_records; skipped {reason: count}; natoms_histogram / natoms_percentiles;
atoms_per_element; has_energy / has_forces / target_names; targets {name: {mean, std}};
linear_reference: (119,) per-element fit E ≈ Σ_Z n_Z c_Z (least squares on element counts,
as JMP's ani1x/trans1x linear_ref scripts; index = Z; null without energies);
raw / referenced: {energy_mean, energy_std, forces_mean, forces_std} before / after
subtracting the linear reference (force components pooled); energy_kind: "total" (DFT total energies)
or "referenced" (the distribution's per-system reference energy subtracted, as OC20 S2EF), null without
energies; units; source_files [{path, bytes, sha256}].
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

NUM_ELEMENTS = 119  # index = atomic number; 0 unused
SKIP_REASONS = ("no_atoms", "nan_positions", "far_positions", "nan_labels")
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
ENERGY_KINDS = ("total", "referenced")


class InconsistentSplitError(ValueError):
    """Records of one split disagree on which labels they carry."""


def element_counts(atomic_numbers: np.ndarray) -> np.ndarray:
    """(N,) atomic numbers -> (NUM_ELEMENTS,) counts per element."""
    z = np.asarray(atomic_numbers, np.int64)
    if z.size and (z.min() < 1 or z.max() >= NUM_ELEMENTS):
        raise ValueError(f"atomic numbers must lie in [1, {NUM_ELEMENTS - 1}], got {z.min()}..{z.max()}")
    return np.bincount(z, minlength=NUM_ELEMENTS).astype(np.float64)


def fit_linear_reference(xtx: np.ndarray, xty: np.ndarray) -> np.ndarray:
    """Least-squares per-element references from normal-equation sums.

    xtx (E, E) = Σ n n^T, xty (E,) = Σ n E over structures with element counts n.
    Returns (E,) coefficients; elements never seen get 0. Collinear counts (e.g. one
    molecule) give the minimum-norm solution.
    """
    present = np.flatnonzero(np.diag(xtx) > 0)
    coef = np.zeros(xtx.shape[0])
    if present.size:
        coef[present] = np.linalg.lstsq(xtx[np.ix_(present, present)], xty[present], rcond=None)[0]
    return coef


def split_energy_kind(meta: dict) -> str | None:
    """Which energy a split's `energy` holds (ENERGY_KINDS), None without energies. Metadata written before
    the field existed is read as "total": every reader wrote totals then except the OCP LMDB one."""
    return meta.get("energy_kind", "total") if meta.get("has_energy") else None


def check_energy_kinds(task: str, metas: dict[str, dict], expected: str | None = None) -> str | None:
    """The one energy kind that the splits of `task` hold ({"<source>-<split>": metadata}), None without
    energies. ValueError naming the splits when they hold different kinds, or not the `expected` one."""
    kinds = {name: split_energy_kind(meta) for name, meta in metas.items() if split_energy_kind(meta)}
    if len(set(kinds.values())) > 1:
        listing = ", ".join(f"{name} ({kind})" for name, kind in kinds.items())
        raise ValueError(f"task {task}: splits {listing} hold different energies; rebuild them to hold one kind")
    kind = next(iter(kinds.values()), None)
    if expected is not None and kind not in (None, expected):
        raise ValueError(f"task {task} expects {expected} energies (its normalisation is for those), "
                         f"but splits {', '.join(kinds)} hold {kind} energies")
    return kind


def _mean_std(total: float, total_sq: float, count: int) -> dict:
    if count == 0:
        return {"mean": None, "std": None}
    mean = total / count
    return {"mean": mean, "std": float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))}


def histogram_percentiles(histogram: dict[int, int]) -> dict:
    """Percentiles (lower interpolation) of a value->count histogram."""
    if not histogram:
        return {}
    values = np.array(sorted(histogram))
    cumulative = np.cumsum([histogram[v] for v in values])
    total = cumulative[-1]
    out = {f"p{p}": int(values[np.searchsorted(cumulative, p / 100 * total)]) for p in PERCENTILES}
    out.update(min=int(values[0]), max=int(values[-1]),
               mean=float(sum(v * c for v, c in histogram.items()) / total))
    return out


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def describe_source_files(paths: list[str]) -> list[dict]:
    return [{"path": os.fspath(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)} for p in sorted(paths)]


class SplitStats:
    """Accumulates the statistics of one split record by record (constant memory)."""

    def __init__(self):
        self.num_records = 0
        self.skipped = dict.fromkeys(SKIP_REASONS, 0)
        self.natoms_histogram: dict[int, int] = {}
        self.atoms_per_element = np.zeros(NUM_ELEMENTS)
        self.labels: tuple | None = None  # (has_energy, has_forces, target names)
        self.xtx = np.zeros((NUM_ELEMENTS, NUM_ELEMENTS))
        self.xty = np.zeros(NUM_ELEMENTS)
        self.energy_sum = self.energy_sq = 0.0
        self.force_sum = self.force_sq = 0.0
        self.force_count = 0
        self.target_sums: dict[str, list[float]] = {}

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, record: dict) -> None:
        labels = ("energy" in record, "forces" in record, tuple(sorted(record.get("targets", {}))))
        if self.labels is None:
            self.labels = labels
        elif labels != self.labels:
            raise InconsistentSplitError(
                f"record {record['source_id']!r} has labels (energy, forces, targets) = {labels}, "
                f"earlier records {self.labels}"
            )
        n = record["atomic_numbers"].shape[0]
        self.num_records += 1
        self.natoms_histogram[n] = self.natoms_histogram.get(n, 0) + 1
        counts = element_counts(record["atomic_numbers"])
        self.atoms_per_element += counts
        if "energy" in record:
            energy = record["energy"]
            present = np.flatnonzero(counts)  # sparse update: structures hold few elements
            self.xtx[np.ix_(present, present)] += np.outer(counts[present], counts[present])
            self.xty += counts * energy
            self.energy_sum += energy
            self.energy_sq += energy * energy
        if "forces" in record:
            forces = record["forces"]
            self.force_sum += float(forces.sum())
            self.force_sq += float(np.square(forces).sum())
            self.force_count += forces.size
        for name, value in record.get("targets", {}).items():
            sums = self.target_sums.setdefault(name, [0.0, 0.0])
            sums[0] += value
            sums[1] += value * value

    def merge(self, other: SplitStats, what: str) -> None:
        """Adds the statistics of the records that follow (`other`, named `what` in errors) to these.

        Builds merge per-shard statistics in shard order, so that the float sums, and so the metadata
        bytes, do not depend on how many processes wrote the shards.
        """
        if other.labels is not None:
            if self.labels is not None and other.labels != self.labels:
                raise InconsistentSplitError(f"{what} has labels (energy, forces, targets) = {other.labels}, "
                                             f"earlier records {self.labels}")
            self.labels = other.labels
        self.num_records += other.num_records
        for reason, n in other.skipped.items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        for n, count in other.natoms_histogram.items():
            self.natoms_histogram[n] = self.natoms_histogram.get(n, 0) + count
        self.atoms_per_element += other.atoms_per_element
        self.xtx += other.xtx
        self.xty += other.xty
        self.energy_sum += other.energy_sum
        self.energy_sq += other.energy_sq
        self.force_sum += other.force_sum
        self.force_sq += other.force_sq
        self.force_count += other.force_count
        for name, (total, total_sq) in other.target_sums.items():
            sums = self.target_sums.setdefault(name, [0.0, 0.0])
            sums[0] += total
            sums[1] += total_sq

    def _energy_stats(self) -> tuple[dict, np.ndarray, dict]:
        """(raw mean/std, (NUM_ELEMENTS,) linear reference, referenced mean/std) of the energies."""
        n = self.num_records
        coef = fit_linear_reference(self.xtx, self.xty)
        # Residual r = E - n·c; its moments follow from the accumulated sums (float64
        # cancellation: relative error ~1e-16 * (|E| / std_r)^2, negligible for real data).
        res_sum = self.energy_sum - coef @ self.atoms_per_element
        res_sq = self.energy_sq - 2 * coef @ self.xty + coef @ self.xtx @ coef
        return _mean_std(self.energy_sum, self.energy_sq, n), coef, _mean_std(res_sum, res_sq, n)

    def finalize(self, *, units: dict, source_files: list[str], energy_kind: str = "total") -> dict:
        if energy_kind not in ENERGY_KINDS:
            raise ValueError(f"energy_kind {energy_kind!r} is not one of {ENERGY_KINDS}")
        has_energy, has_forces, target_names = self.labels or (False, False, ())
        no_stats = {"mean": None, "std": None}
        raw, coef, referenced = self._energy_stats() if has_energy else (no_stats, None, no_stats)
        forces = _mean_std(self.force_sum, self.force_sq, self.force_count) if has_forces else no_stats

        def spread(energy: dict) -> dict:  # forces do not change under energy referencing
            return {"energy_mean": energy["mean"], "energy_std": energy["std"],
                    "forces_mean": forces["mean"], "forces_std": forces["std"]}

        return {
            "num_records": self.num_records,
            "skipped": dict(self.skipped),
            "natoms_histogram": {str(k): v for k, v in sorted(self.natoms_histogram.items())},
            "natoms_percentiles": histogram_percentiles(self.natoms_histogram),
            "atoms_per_element": {str(z): int(c) for z, c in enumerate(self.atoms_per_element) if c},
            "has_energy": has_energy,
            "has_forces": has_forces,
            "target_names": list(target_names),
            "targets": {k: _mean_std(s, sq, self.num_records) for k, (s, sq) in sorted(self.target_sums.items())},
            # index = atomic number; E_referenced = E - Σ_atoms linear_reference[Z]
            "linear_reference": None if coef is None else coef.tolist(),
            "raw": spread(raw),
            "referenced": spread(referenced),
            "energy_kind": energy_kind if has_energy else None,
            "units": dict(units),
            "source_files": describe_source_files(source_files),
        }
