"""How a cohort is split: the validation share of the training items, and the one rule that keeps a patient's
items together while balancing labels (shared by every dataset kind that splits its own items,
and by the cross-validation folds of :mod:`ips_search.data.cohort`)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold


def n_validation(n: int, fraction: float) -> int:
    """How many of ``n`` training items become validation: ``fraction`` of them, leaving at least one of each."""
    return min(max(1, round(fraction * n)), n - 1)


def _grouped_folds(patients: Sequence[str], strata: Sequence[str], k: int, seed: int) -> np.ndarray:
    """scikit-learn's ``StratifiedGroupKFold``: every patient's items in one fold, each fold's labels as close to the
    cohort's proportions as whole patients allow, shuffled with ``seed``. A patient whose items carry different
    labels is placed by its items' labels together, as scikit-learn does."""
    folds = np.full(len(patients), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(patients)), strata, groups=patients)):
        folds[held] = fold
    return folds


def group_holdout(patients: Sequence[str], labels: Sequence[object], fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of about ``fraction`` of the items, whole patients, labels stratified as far as patients allow.

    One fold of ``round(1 / fraction)`` (at least 2, at most one per patient) :func:`group_folds`: the first fold
    that holds every class, where one does (fold 0 otherwise), so a cohort of a few patients per class keeps both
    classes in the part held out more often than fold 0 alone would."""
    patients = [str(p) for p in patients]
    strata = [str(y) for y in labels]
    k = min(max(2, round(1 / fraction)), len(set(patients)))
    folds = group_folds(patients, strata, k, seed)
    classes = set(strata)
    for fold in range(k):
        held = folds == fold
        if {strata[i] for i in np.flatnonzero(held)} == classes:
            return held
    return folds == 0


def group_folds(patients: Sequence[str], strata: Sequence[object], k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each item: :func:`_grouped_folds`, with two exceptions of scikit-learn's making. Where
    no patient holds two items (an image folder), ``StratifiedKFold`` cuts the same kind of folds (the grouped search
    costs patients x folds Python steps: seconds per build at 10,000 images). Where every class has fewer items than
    ``k``, scikit-learn refuses to stratify; the folds are then cut by patient alone (one patient is already a
    class's whole share)."""
    patients = [str(p) for p in patients]
    strata = [str(y) for y in strata]
    with warnings.catch_warnings():  # a class smaller than the folds is expected of a small cohort
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        try:
            if len(set(patients)) == len(patients):
                folds = np.full(len(patients), -1, dtype=np.int64)
                splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
                for fold, (_, held) in enumerate(splitter.split(np.zeros(len(patients)), strata)):
                    folds[held] = fold
                return folds
            return _grouped_folds(patients, strata, k, seed)
        except ValueError:  # every class smaller than the folds: scikit-learn cannot stratify
            if len(set(strata)) == 1:  # pragma: no cover - one stratum holds every item, at least k
                raise
            return group_folds(patients, [""] * len(patients), k, seed)
