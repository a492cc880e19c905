"""Classification metrics as pure functions over integer predictions and labels."""

from __future__ import annotations

import numpy as np


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    return float((preds == labels).mean()) if len(labels) else float("nan")


def macro_f1(preds: np.ndarray, labels: np.ndarray, num_labels: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    scores = []
    for c in range(num_labels):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        if tp + fp + fn == 0:
            continue  # class absent from both: not counted
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores)) if scores else float("nan")


def summarize(values, prefix: str, higher_is_better: bool = True) -> dict[str, float]:
    """Mean, standard deviation and the mean of the worst 10% (at least one client) of per-client
    scores, as ``{prefix}_mean``, ``_std``, ``_worst10`` (worst: lowest, or highest if lower is better)."""
    a = np.sort(np.asarray(values, dtype=float))
    if not higher_is_better:
        a = a[::-1]
    if len(a) == 0:
        return {}
    k = max(1, int(np.ceil(0.1 * len(a))))
    return {
        f"{prefix}_mean": float(a.mean()),
        f"{prefix}_std": float(a.std()),
        f"{prefix}_worst10": float(a[:k].mean()),
    }


def summarize_clients(accuracies: list[float]) -> dict[str, float]:
    """Mean, standard deviation and worst-10% mean of per-client accuracies (fairness view)."""
    return summarize(accuracies, "client_accuracy")
