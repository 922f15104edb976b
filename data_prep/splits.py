"""Train/val/test index splits as JMP (and MatBench) define them.

All random splits shuffle np.arange(n) in place with np.random.RandomState(seed) and cut
consecutive slices in the order train, val, test, as JMP's dataset scripts do.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

JMP_SEED = 42
MATBENCH_SEED = 18012019
MATBENCH_FOLDS = 5
SPLITS = ("train", "val", "test")


def shuffled_indices(n: int, seed: int = JMP_SEED) -> np.ndarray:
    """(n,) permutation of range(n) from RandomState(seed).shuffle."""
    indices = np.arange(n)
    np.random.RandomState(seed).shuffle(indices)
    return indices


def split_by_counts(n: int, num_train: int, num_val: int, seed: int = JMP_SEED) -> dict[str, np.ndarray]:
    """Shuffled indices cut into train (num_train), val (num_val) and test (the rest)."""
    if num_train < 0 or num_val < 0 or num_train + num_val > n:
        raise ValueError(f"cannot take {num_train} train + {num_val} val items from {n}")
    indices = shuffled_indices(n, seed)
    return {
        "train": indices[:num_train],
        "val": indices[num_train : num_train + num_val],
        "test": indices[num_train + num_val :],
    }


def split_by_fractions(n: int, train: float = 0.8, test: float = 0.1, seed: int = JMP_SEED) -> dict[str, np.ndarray]:
    """JMP's 80/10/10 rule (SPICE, QMOF): int(n*train) train, int(n*test) test, val the rest."""
    num_train, num_test = int(n * train), int(n * test)
    return split_by_counts(n, num_train, n - num_train - num_test, seed)


def qm9_split(n: int, num_holdout: int = 10_000, seed: int = JMP_SEED) -> dict[str, np.ndarray]:
    """QM9: num_holdout (JMP: 10,000) val and as many test, the rest train (JMP qm9.py)."""
    return split_by_counts(n, n - 2 * num_holdout, num_holdout, seed)


def rmd17_split(n: int, seed: int = JMP_SEED) -> dict[str, np.ndarray]:
    """rMD17: 950 train, 50 val, the rest test (JMP datasets/finetune/rmd17.py)."""
    return split_by_counts(n, 950, 50, seed)


def md22_split(n: int, train_size: int, seed: int = JMP_SEED) -> dict[str, np.ndarray]:
    """MD22: `train_size` frames of which int(5%) go to val, the rest test (JMP md22.py)."""
    num_val = int(train_size * 0.05)
    return split_by_counts(n, train_size - num_val, num_val, seed)


def kfold_test_indices(n: int, n_splits: int = MATBENCH_FOLDS, seed: int = MATBENCH_SEED) -> list[np.ndarray]:
    """Sorted test indices of each fold of a shuffled K-fold (scikit-learn KFold(shuffle=True))."""
    order = shuffled_indices(n, seed)
    sizes = np.full(n_splits, n // n_splits)
    sizes[: n % n_splits] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.sort(order[bounds[i] : bounds[i + 1]]) for i in range(n_splits)]


def stratified_kfold_test_indices(
    labels: Sequence, n_splits: int = MATBENCH_FOLDS, seed: int = MATBENCH_SEED
) -> list[np.ndarray]:
    """Sorted test indices per fold of scikit-learn's StratifiedKFold(shuffle=True).

    Classes are numbered by first appearance; the sorted class sequence is dealt
    round-robin to folds to get per-fold class counts, then each class's fold
    assignments are shuffled with one shared RandomState(seed).
    """
    y = np.asarray(labels)
    _, first_index, inverse = np.unique(y, return_index=True, return_inverse=True)
    _, class_by_appearance = np.unique(first_index, return_inverse=True)
    encoded = class_by_appearance[inverse.reshape(-1)]
    num_classes = first_index.shape[0]
    if np.bincount(encoded).max() < n_splits:
        raise ValueError(f"every class has fewer than {n_splits} members; cannot stratify")
    ordered = np.sort(encoded)
    allocation = np.stack([np.bincount(ordered[i::n_splits], minlength=num_classes) for i in range(n_splits)])
    rng = np.random.RandomState(seed)
    test_fold = np.empty(y.shape[0], dtype=np.int64)
    for k in range(num_classes):
        folds_for_class = np.repeat(np.arange(n_splits), allocation[:, k])
        rng.shuffle(folds_for_class)
        test_fold[encoded == k] = folds_for_class
    return [np.flatnonzero(test_fold == i) for i in range(n_splits)]


def matbench_fold_split(
    n: int, test_indices: np.ndarray, seed: int = JMP_SEED
) -> dict[str, np.ndarray]:
    """One MatBench fold as JMP uses it: the official test fold, and the remaining
    (sorted) train+val items shuffled with RandomState(seed), first int(90%) train."""
    train_val = np.setdiff1d(np.arange(n), test_indices)
    order = shuffled_indices(train_val.shape[0], seed)
    num_train = int(train_val.shape[0] * 0.9)
    return {
        "train": train_val[order[:num_train]],
        "val": train_val[order[num_train:]],
        "test": np.asarray(test_indices),
    }


def group_holdout(
    group_sizes: dict[str, int], holdout_items: int, seed: int = JMP_SEED
) -> dict[str, list[str]]:
    """Whole-group val/test holdout (ANI-1x): shuffle the group keys, give val whole groups
    until it holds >= holdout_items items, then test likewise; the rest is train.

    JMP shuffles Python's `random` 6 times without a seed; here one seeded shuffle is used.
    """
    keys = sorted(group_sizes)
    order = shuffled_indices(len(keys), seed)
    shuffled = [keys[i] for i in order]
    out = {"val": [], "test": [], "train": []}
    position = 0
    for split in ("val", "test"):
        taken = 0
        while position < len(shuffled) and taken < holdout_items:
            out[split].append(shuffled[position])
            taken += group_sizes[shuffled[position]]
            position += 1
    out["train"] = shuffled[position:]
    return out
