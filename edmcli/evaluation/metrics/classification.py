"""Classification metrics of the view classifier (A2C vs A4C): confusion matrix, accuracy (paper
eq. 18), balanced accuracy, and the per-image correctness that the bootstrap resamples."""

from __future__ import annotations

import numpy as np

__all__ = ["accuracy", "balanced_accuracy", "classification_metrics", "confusion_matrix"]


def _classes(pred, target, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(np.int64).ravel()
    target = np.asarray(target).astype(np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in length: {pred.size} and {target.size}")
    if pred.size == 0:
        raise ValueError("no predictions to score")
    for name, values in (("pred", pred), ("target", target)):
        if values.min() < 0 or values.max() >= num_classes:
            raise ValueError(f"{name} holds classes outside 0..{num_classes - 1}")
    return pred, target


def confusion_matrix(pred, target, num_classes: int = 2) -> np.ndarray:
    """(C, C) counts; rows are the true classes, columns the predicted ones."""
    pred, target = _classes(pred, target, num_classes)
    flat = np.bincount(target * num_classes + pred, minlength=num_classes**2)
    return flat.reshape(num_classes, num_classes)


def accuracy(pred, target, num_classes: int = 2) -> float:
    """(TP + TN) / all (paper eq. 18), for any number of classes: trace / total."""
    cm = confusion_matrix(pred, target, num_classes)
    return float(np.trace(cm) / cm.sum())


def balanced_accuracy(pred, target, num_classes: int = 2) -> float:
    """Mean recall over the classes present in ``target`` (absent classes have no recall)."""
    cm = confusion_matrix(pred, target, num_classes)
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present]))


def classification_metrics(pred, target, num_classes: int = 2) -> dict[str, object]:
    """Accuracy, balanced accuracy, confusion matrix and per-image correctness (``correct``,
    float 0/1, the array the bootstrap resamples)."""
    p, t = _classes(pred, target, num_classes)
    return {
        "accuracy": accuracy(p, t, num_classes),
        "balanced_accuracy": balanced_accuracy(p, t, num_classes),
        "confusion_matrix": confusion_matrix(p, t, num_classes),
        "correct": (p == t).astype(np.float64),
    }
