"""Metrics and parity plots for evaluating a model on a prepared split.

    regression_metrics(pred, true)            -> {"mae", "rmse", "count"}
    force_metrics(pred_list, true_list, mask) -> per-component MAE/RMSE and mean per-atom error norm
    balanced_accuracy(pred_labels, true_labels)
    compute_metrics(truth, prediction)        -> every metric the two dicts allow
    parity_plot / force_parity_plot           -> PNG files (matplotlib, Agg backend)

Plots import matplotlib lazily so that the metric functions stay cheap to import.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


class EvaluationInputError(ValueError):
    """Predictions and labels that cannot be compared (shape mismatch, empty, non-finite)."""


def _pair(predicted, true, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Float64 copies of two equally shaped, non-empty, finite arrays; errors name `what`."""
    predicted, true = np.asarray(predicted, np.float64), np.asarray(true, np.float64)
    if predicted.shape != true.shape:
        raise EvaluationInputError(f"{what}: predicted shape {predicted.shape} != true shape {true.shape}")
    if predicted.size == 0:
        raise EvaluationInputError(f"{what}: no values to compare")
    for name, values in (("predicted", predicted), ("true", true)):
        if not np.all(np.isfinite(values)):
            where = np.argwhere(~np.isfinite(values))[0].tolist()
            raise EvaluationInputError(f"{what}: {name} values contain NaN/inf (first at index {where})")
    return predicted, true


def regression_metrics(predicted, true, what: str = "values") -> dict[str, float]:
    """MAE, RMSE and count over all elements of two equally shaped arrays (any shape)."""
    predicted, true = _pair(predicted, true, what)
    error = predicted - true
    return {"mae": float(np.mean(np.abs(error))), "rmse": float(np.sqrt(np.mean(error ** 2))), "count": int(error.size)}


def force_metrics(predicted: Sequence[np.ndarray], true: Sequence[np.ndarray],
                  mask: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """Force errors over the atoms selected by `mask` (all atoms when None).

    predicted, true: per structure (n_i, 3) eV/Å; mask: per structure (n_i,) bool (e.g. ~fixed).
    Returns mae / rmse over force components (eV/Å), l2_mae = mean over atoms of |F_pred - F_true|
    (eV/Å), count = number of atoms.
    """
    if len(predicted) != len(true):
        raise EvaluationInputError(f"forces: {len(predicted)} predicted structures, {len(true)} true")
    if mask is None:
        mask = [np.ones(len(f), bool) for f in true]
    for i, (p, t, m) in enumerate(zip(predicted, true, mask)):
        if np.shape(p) != np.shape(t) or np.shape(m) != (len(t),):
            raise EvaluationInputError(f"forces of structure {i}: predicted {np.shape(p)}, true {np.shape(t)}, "
                                       f"mask {np.shape(m)}")
    pred = np.concatenate([np.asarray(p)[np.asarray(m, bool)] for p, m in zip(predicted, mask)]).reshape(-1, 3)
    ref = np.concatenate([np.asarray(t)[np.asarray(m, bool)] for t, m in zip(true, mask)]).reshape(-1, 3)
    result = regression_metrics(pred, ref, "forces")
    result["l2_mae"] = float(np.mean(np.linalg.norm(pred - ref, axis=-1)))
    result["count"] = int(pred.shape[0])
    return result


def balanced_accuracy(predicted_labels, true_labels) -> float:
    """Mean over the classes present in true_labels of the recall (fraction of that class predicted right).

    predicted_labels, true_labels: (B,) integer class labels. Chance level is 1 / num_classes whatever
    the class balance, unlike plain accuracy.
    """
    predicted, true = np.asarray(predicted_labels).reshape(-1), np.asarray(true_labels).reshape(-1)
    if predicted.shape != true.shape or true.size == 0:
        raise EvaluationInputError(f"labels: predicted shape {predicted.shape}, true shape {true.shape} "
                                   "(need equal, non-empty)")
    recalls = [np.mean(predicted[true == c] == c) for c in np.unique(true)]
    return float(np.mean(recalls))


def classification_metrics(logits, true_labels) -> dict[str, float]:
    """Balanced accuracy, accuracy and count of (B, C) class logits (or probabilities) against (B,) labels."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise EvaluationInputError(f"class logits must be (B, C), got shape {logits.shape}")
    true = np.asarray(true_labels).reshape(-1)
    if true.size != logits.shape[0] or true.size == 0:
        raise EvaluationInputError(f"{logits.shape[0]} rows of class logits for {true.size} labels")
    if (np.any(true != np.round(true)) or true.min() < 0 or true.max() >= logits.shape[1]):
        raise EvaluationInputError(f"class labels must be integers in 0..{logits.shape[1] - 1}, "
                                   f"got {sorted(set(true.tolist()))[:10]}")
    predicted = np.argmax(logits, axis=1)
    true = true.astype(np.int64)
    return {"balanced_accuracy": balanced_accuracy(predicted, true),
            "accuracy": float(np.mean(predicted == true)),
            "count": int(true.size)}


def compute_metrics(truth: Mapping, prediction: Mapping) -> dict[str, dict[str, float]]:
    """Every metric that truth and prediction both allow.

    truth keys (all optional): "energy" (B,) eV, "natoms" (B,), "forces" list of (n_i, 3) eV/Å,
      "force_mask" list of (n_i,) bool, "target" (B,), "labels" (B,) int.
    prediction keys: "energy" (B,), "forces" list, "target" (B,), "logits" (B, C).
    Returns {"energy": ..., "energy_per_atom": ..., "forces": ..., "target": ..., "classification": ...}
    for the groups present in both.
    """
    metrics = {}
    if "energy" in truth and "energy" in prediction:
        metrics["energy"] = regression_metrics(prediction["energy"], truth["energy"], "energy")
        if "natoms" in truth:
            natoms = np.asarray(truth["natoms"], np.float64)
            metrics["energy_per_atom"] = regression_metrics(np.asarray(prediction["energy"]) / natoms,
                                                            np.asarray(truth["energy"]) / natoms, "energy per atom")
    if "forces" in truth and "forces" in prediction:
        metrics["forces"] = force_metrics(prediction["forces"], truth["forces"], truth.get("force_mask"))
    if "target" in truth and "target" in prediction:
        metrics["target"] = regression_metrics(prediction["target"], truth["target"], "target")
    if "labels" in truth and "logits" in prediction:
        metrics["classification"] = classification_metrics(prediction["logits"], truth["labels"])
    return metrics


def _axes_limits(*arrays) -> tuple[float, float]:
    low, high = min(float(np.min(a)) for a in arrays), max(float(np.max(a)) for a in arrays)
    pad = 0.05 * (high - low) or 0.5  # a single point still gets a visible box
    return low - pad, high + pad


def _parity_axes(ax, true: np.ndarray, predicted: np.ndarray, label: str, unit: str) -> None:
    """One parity panel: points, the y = x line, equal square limits, MAE in the title."""
    mae = float(np.mean(np.abs(predicted - true)))
    limits = _axes_limits(true, predicted)
    ax.plot(limits, limits, color="0.3", linewidth=1, linestyle="--", zorder=1, label="y = x")
    ax.scatter(true, predicted, s=6 if true.size > 500 else 14, alpha=0.6, linewidths=0, zorder=2, rasterized=True)
    ax.set_xlim(limits)
    ax.set_ylim(limits)
    ax.set_aspect("equal")
    ax.set_xlabel(f"true {label} ({unit})")
    ax.set_ylabel(f"predicted {label} ({unit})")
    ax.set_title(f"{label}: MAE {mae:.4g} {unit} (n={true.size})")
    ax.legend(loc="upper left", frameon=False)


def _figure(num_panels: int):
    import matplotlib
    matplotlib.use("Agg")  # files only; no display needed
    from matplotlib import pyplot as plt
    return plt, plt.subplots(1, num_panels, figsize=(4.6 * num_panels, 4.8), squeeze=False,
                             layout="constrained")


def parity_plot(true, predicted, path: str, *, label: str, unit: str, suptitle: str | None = None) -> str:
    """Writes a parity PNG of predicted vs true (B,) values to `path`; returns path."""
    predicted, true = _pair(predicted, true, label)
    plt, (fig, axes) = _figure(1)
    _parity_axes(axes[0, 0], true.reshape(-1), predicted.reshape(-1), label, unit)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def force_parity_plot(true: np.ndarray, predicted: np.ndarray, path: str, *, suptitle: str | None = None) -> str:
    """Writes a PNG with one parity panel per force component (x, y, z) of (M, 3) eV/Å arrays; returns path."""
    predicted, true = _pair(predicted, true, "forces")
    if true.ndim != 2 or true.shape[1] != 3:
        raise EvaluationInputError(f"forces for the parity plot must be (M, 3), got {true.shape}")
    plt, (fig, axes) = _figure(3)
    for k, axis in enumerate("xyz"):
        _parity_axes(axes[0, k], true[:, k], predicted[:, k], f"F{axis}", "eV/Å")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
