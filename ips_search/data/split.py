"""How a cohort is split: the validation share of the training items, the seeded test draw, and the one rule that
keeps a patient's items together while balancing labels (shared by every dataset kind that splits its own items,
and by the cross-validation folds of :mod:`ips_search.data.cohort`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def n_validation(n: int, fraction: float) -> int:
    """How many of ``n`` training items become validation: ``fraction`` of them, leaving at least one of each."""
    return min(max(1, round(fraction * n)), n - 1)


def seeded_test_split(n: int, n_test: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(test indices, the rest shuffled)`` of ``n`` items: ``fraction`` of them (at most ``n_test``, at least one)
    held out for test, drawn with ``rng`` (the folder and slides datasets' split when none is given)."""
    perm = rng.permutation(n)
    k = max(1, min(n_test, round(fraction * n)))
    return perm[:k], perm[k:]


def group_folds(patients: Sequence[str], labels: Sequence[object], k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each item: every patient's items in one fold, each fold's labels as close to the
    cohort's proportions as whole patients allow (scikit-learn's ``StratifiedGroupKFold``, shuffled with ``seed``).

    A patient whose items carry different labels is placed by its items' labels together, as scikit-learn does.
    Needs at least ``k`` patients (the caller names the problem first)."""
    patients = np.asarray([str(p) for p in patients])
    strata = np.unique(np.asarray([str(y) for y in labels]), return_inverse=True)[1]
    folds = np.full(len(patients), -1, dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed % (2**32))
    for fold, (_, held) in enumerate(splitter.split(np.zeros(len(patients)), strata, groups=patients)):
        folds[held] = fold
    return folds


def group_holdout(patients: Sequence[str], labels: Sequence[object], fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of about ``fraction`` of the items, whole patients only, stratified by label as far as
    patients allow: one fold of ``round(1 / fraction)`` (at least 2) :func:`group_folds`. At least one patient is
    held out and at least one kept (the caller checks there are two patients)."""
    n_patients = len(set(map(str, patients)))
    k = min(max(2, round(1 / fraction)), n_patients) if fraction > 0 else 2
    return group_folds(patients, labels, k, seed) == 0
