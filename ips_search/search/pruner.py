"""Pruning after a fold: a cross-validated trial whose first folds are clearly below the best so far stops there.

Every trial of a search validates on the same folds in the same order, so a trial's mean over its first f folds is
compared with the best finished trial's mean over the same f folds (a paired comparison: a hard fold lowers both).
The rule, at the end of fold f (1 <= f < K): stop when

    mean_f(trial) < mean_f(best) - prune_margin - sd(best) / sqrt(f)

where sd(best) is the spread of the best trial's K fold scores. The last term is the standard error of a mean over
f folds: on a small cohort one fold's score swings by far more than any sensible margin (a 5-patient fold's AUC is
0.3 or 1.0 by luck), and a fixed margin then prunes nearly every trial after its first fold and ranks the few that
survive by that luck. The margin alone is the rule when the folds agree. The last fold is never pruned, and nothing
is pruned before a trial has finished all K folds. A pruned trial ends as ``early-stopped``; it never ranks (only
completed trials do), and the searcher learns its partial mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import tune

from ips_search.experiment import METRIC, Status
from ips_search.experiment.record import FOLD_SCORE


class FoldPruner(tune.Stopper):
    """Ray Tune stopper of the rule above (``margin`` = ``--prune-margin``, ``folds`` = K)."""

    def __init__(self, folds: int, margin: float) -> None:
        self.folds, self.margin = folds, margin
        self.best: list[float] | None = None  # the best finished trial's fold scores
        self.best_mean = -np.inf
        self.best_sd = 0.0
        self.pruned: set[str] = set()

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        scores = [result[f"{FOLD_SCORE}{k}"] for k in range(self.folds) if f"{FOLD_SCORE}{k}" in result]
        if result.get("status") == Status.COMPLETED.value and len(scores) == self.folds:
            mean = float(result.get(METRIC, np.mean(scores)))
            if mean > self.best_mean:
                self.best, self.best_mean = [float(v) for v in scores], mean
                self.best_sd = float(np.std(self.best, ddof=1)) if len(self.best) > 1 else 0.0
            return False
        done = int(result.get("folds_done") or 0)
        fold_end = result.get("status") == Status.RUNNING.value and done == len(scores) and 0 < done < self.folds
        if not fold_end or self.best is None or result.get("fold") != done - 1:
            return False
        bar = float(np.mean(self.best[:done])) - self.margin - self.best_sd / np.sqrt(done)
        if float(np.mean(scores[:done])) < bar:
            self.pruned.add(trial_id)
            return True
        return False

    def stop_all(self) -> bool:
        return False
