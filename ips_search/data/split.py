"""How a cohort is split: the validation share of the training items and the seeded test draw (shared by every
dataset kind that splits its own items)."""

from __future__ import annotations

import numpy as np


def n_validation(n: int, fraction: float) -> int:
    """How many of ``n`` training items become validation: ``fraction`` of them, leaving at least one of each."""
    return min(max(1, round(fraction * n)), n - 1)


def seeded_test_split(n: int, n_test: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``(test indices, the rest shuffled)`` of ``n`` items: ``fraction`` of them (at most ``n_test``, at least one)
    held out for test, drawn with ``rng`` (the folder and slides datasets' split when none is given)."""
    perm = rng.permutation(n)
    k = max(1, min(n_test, round(fraction * n)))
    return perm[:k], perm[k:]
