"""DFER metrics: WAR (accuracy) and UAR (mean per-class recall), as in DFEW/FERV39k papers.

UAR averages recall over the classes *present in the ground truth*, as sklearn's
`balanced_accuracy_score` does, so a source with no "disgust" clips is not punished for it.
"""

from __future__ import annotations

import numpy as np

from hdf.classes import NUM_CLASSES


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """Counts C[i, j] of clips of true class i predicted as class j."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
    """Recall of each class; NaN for classes absent from the ground truth."""
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


def uar(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = NUM_CLASSES) -> float:
    """Unweighted average recall over the classes present in `y_true` (0.0 if it is empty)."""
    if len(y_true) == 0:
        return 0.0
    return float(np.nanmean(per_class_recall(confusion_matrix(y_true, y_pred, num_classes))))


def war(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Weighted average recall, i.e. plain accuracy (0.0 if `y_true` is empty)."""
    y_true = np.asarray(y_true)
    if len(y_true) == 0:
        return 0.0
    return float(np.mean(y_true == np.asarray(y_pred)))


def balanced_cross_entropy(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean over the classes present of each class's mean cross-entropy (-log p[label]).

    Weighs every class alike, as UAR does: on a split dominated by easy classes the plain mean
    is low while its UAR is not. Probabilities are floored at 1e-12 (a loss of at most 27.6).
    """
    ce = -np.log(np.maximum(probs[np.arange(len(labels)), labels], 1e-12))
    return float(np.mean([ce[labels == c].mean() for c in np.unique(labels)]))
