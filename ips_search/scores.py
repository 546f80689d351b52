"""The metrics a search ranks configs by (``evaluation.metric``), from class probabilities and labels.

scikit-learn computes each: binary AUC from the positive class's probability, multi-class AUC as the macro mean of
one-vs-rest AUCs, multi-label AUC as the macro mean over labels; balanced accuracy is the mean recall per class.
A task's score is None where it is undefined (a split holding one class); a model's score is the mean over its tasks.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
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
    with warnings.catch_warnings():  # a class predicted but absent from a small split is expected, not news
        warnings.simplefilter("ignore", UserWarning)
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


def task_arrays(rows: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, bool]:
    """One task's rows of a predictions table (``label`` read as text, ``p0, p1, ..``) as ``(prob, y, multi_label)``:
    a multi-label task's label is its 0/1 string with one character per probability column."""
    columns = [c for c in rows.columns if c[:1] == "p" and c[1:].isdigit()]
    prob = rows[sorted(columns, key=lambda c: int(c[1:]))].to_numpy(dtype=np.float64)
    labels = rows["label"].astype(str).to_numpy()
    multi_label = len(labels) > 0 and all(len(v) == prob.shape[1] and set(v) <= {"0", "1"} for v in labels)
    y = np.array([[int(c) for c in v] for v in labels]) if multi_label else labels.astype(np.int64)
    return prob, y, multi_label


def prediction_score(metric: str, predictions: pd.DataFrame) -> float:
    """``metric`` of a predictions table (one or more tasks): the mean over its tasks."""
    return mean_score([score(metric, *task_arrays(rows)) for _, rows in predictions.groupby("task", sort=True)])


def bootstrap_interval(
    runs: Sequence[pd.DataFrame], metric: str, resamples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean score of ``runs`` (prediction tables of one config's seeds on
    the same test set), resampling patients with replacement, each with all of its slides: slides of one patient
    are not independent, so the patient is the unit. NaN bounds when no resample gives a defined score."""
    patients = np.unique(runs[0]["patient"].astype(str).to_numpy())
    # per run and task: (prob, y, multi_label, the rows of each patient)
    tables = []
    for run in runs:
        for _, rows in run.groupby("task", sort=True):
            prob, y, multi_label = task_arrays(rows)
            owner = rows["patient"].astype(str).to_numpy()
            tables.append((prob, y, multi_label, [np.flatnonzero(owner == p) for p in patients]))
    n_tasks = len(tables) // len(runs)
    rng = np.random.default_rng(seed)
    means = []
    for _ in range(resamples):
        drawn = rng.integers(0, len(patients), len(patients))
        values = []
        for prob, y, multi_label, rows_of in tables:
            rows = np.concatenate([rows_of[i] for i in drawn])
            values.append(score(metric, prob[rows], y[rows], multi_label))
        per_run = [mean_score(values[k : k + n_tasks]) for k in range(0, len(values), n_tasks)]
        if np.isfinite(per_run).all():
            means.append(float(np.mean(per_run)))
    if not means:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)
