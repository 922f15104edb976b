"""Transition-1x-like paths of QM9 molecules: a bond stretched to dissociation, a torsion scan, or an IDPP
hydrogen transfer, labelled by GFN2-xTB."""
from __future__ import annotations

from typing import Iterator

import numpy as np
from ase import Atoms
from ase.data import covalent_radii
from ase.mep import NEB

from data_prep.synthetic.molecules import label_group


# Reaction paths with two atoms closer than this fraction of their covalent-radius sum are dropped
# (0.75 Å for C-H): they gave forces of ~100 eV/Å.
CLASH_FACTOR = 0.7


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


def reaction_groups(seed: int, group_size: int, pool) -> Iterator[list[dict]]:
    """Groups of group_size images along one reaction-like path of one QM9 molecule."""
    for k, (index, numbers, positions) in enumerate(pool):
        path = _reaction_path(numbers, positions, group_size, np.random.default_rng([seed, 2, k]))
        if path is None:
            continue
        kind, frames = path
        group = label_group(numbers, frames, [f"reactions/qm9_{index:06d}/{kind}/{c}" for c in range(group_size)])
        if group is not None:
            yield group
