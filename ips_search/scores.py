"""The metrics a search ranks configs by (``evaluation.metric``), from class probabilities and labels.

scikit-learn computes each: binary AUC from the positive class's probability, multi-class AUC as the macro mean of
one-vs-rest AUCs, multi-label AUC as the macro mean over labels; balanced accuracy is the mean recall per class.
A task's score is None where it is undefined (a split holding one class); a model's score is the mean over its tasks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score

from ips_search.config import METRICS


def _decisions(prob: np.ndarray, multi_label: bool) -> np.ndarray:
    return (prob > 0.5).astype(np.int64) if multi_label else prob.argmax(1)


def accuracy(prob: np.ndarray, y: np.ndarray, multi_label: bool = False) -> float | None:
    """Share of items (multi-label: of item-label pairs) predicted right."""
    if multi_label:
        return float(accuracy_score((y > 0.5).ravel(), _decisions(prob, True).ravel()))
    return float(accuracy_score(y, _decisions(prob, False)))


def balanced_accuracy(prob: np.ndarray, y: np.ndarray, multi_label: bool = False) -> float | None:
    """Mean recall over the classes present (multi-label: mean over labels of each label's balanced accuracy)."""
    if multi_label:
        pairs = zip(prob.T, (y > 0.5).astype(np.int64).T, strict=True)
        per_label = [balanced_accuracy(np.stack([1 - p, p], 1), t) for p, t in pairs]
        defined = [v for v in per_label if v is not None]
        return float(np.mean(defined)) if defined else None
    if len(np.unique(y)) < 2:
        return None
    return float(balanced_accuracy_score(y, _decisions(prob, False)))


def auc(prob: np.ndarray, y: np.ndarray, multi_label: bool = False) -> float | None:
    """ROC AUC: binary from the positive class, multi-class macro one-vs-rest, multi-label macro over labels; None
    when a class (or a label's positives or negatives) is missing, where it is undefined."""
    try:
        if multi_label:
            return float(roc_auc_score(y, prob, average="macro"))
        present = np.unique(y)
        if len(present) < 2:
            return None
        if prob.shape[1] == 2:
            return float(roc_auc_score(y, prob[:, 1]))
        if len(present) < prob.shape[1]:  # one-vs-rest needs every class in the split
            return None
        return float(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    except ValueError:
        return None


SCORES: dict[str, Callable[..., float | None]] = {
    "auc": auc,
    "balanced_accuracy": balanced_accuracy,
    "accuracy": accuracy,
}
assert tuple(SCORES) == METRICS, "every evaluation.metric needs its function here"


def score(metric: str, prob: np.ndarray, y: np.ndarray, multi_label: bool = False) -> float | None:
    """``metric`` (one of :data:`ips_search.config.METRICS`) of one task's probabilities ``prob`` (n, C) and labels
    ``y`` (n,) (multi-label: (n, K) 0/1)."""
    return SCORES[metric](np.asarray(prob, dtype=np.float64), np.asarray(y), multi_label)


def mean_score(values: Sequence[float | None]) -> float:
    """The mean of the defined scores (NaN when none is)."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else float("nan")
