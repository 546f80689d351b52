"""Pruning inside a cross-validation: a trial whose folds so far are clearly below the best so far stops there.

Every trial of a search validates on the same folds in the same order, so a trial's running mean is compared with
the best finished trial's running mean at the same point (a paired comparison: a hard fold lowers both). The running
mean at epoch e of fold f (``val_score_mean``) is the mean of the f finished folds' scores and the running fold's
score at epoch e. Checks come every ``interval`` epochs of a fold and at each fold's end (Optuna's ``interval_steps``);
at check (f, e), with f counted from 0, stop when

    running_mean(trial) < running_mean(best) - prune_margin - sd(best) / sqrt(f + 1)

where sd(best) is the spread of the best trial's K fold scores. The last term is the standard error of a mean over
f + 1 folds: on a small cohort one fold's score swings by far more than any sensible margin (a 5-patient fold's AUC
is 0.3 or 1.0 by luck), and a fixed margin then prunes nearly every trial after its first fold and ranks the few that
survive by that luck. The margin alone is the rule when the folds agree. Checks inside a fold cut a config that has
not learned by a third of its first fold instead of after the whole fold: that is where most of a 5-fold search's
cost went (a configuration that never finds the signal is the common case). The last fold is never pruned, and
nothing is pruned before a trial has finished all K folds. A pruned trial ends as ``early-stopped``; it never ranks
(only completed trials do), and the searcher learns its partial mean.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from ray import tune

from ips_search.experiment import METRIC, Status
from ips_search.experiment.record import FOLD_SCORE

Point = tuple[int, int]  # (fold, epoch in that fold): where a trial's running mean is compared


class FoldPruner(tune.Stopper):
    """Ray Tune stopper of the rule above: ``folds`` = K, ``epochs`` per fold, ``margin`` = ``--prune-margin``,
    ``interval`` = ``--prune-interval`` (epochs between checks inside a fold; 0: at fold ends only)."""

    def __init__(self, folds: int, margin: float, epochs: int, interval: int = 0) -> None:
        self.folds, self.margin, self.epochs, self.interval = folds, margin, epochs, interval
        self.curves: dict[str, dict[Point, float]] = {}  # each running trial's running means so far
        self.best: dict[Point, float] | None = None  # the best finished trial's running means
        self.best_mean = -np.inf
        self.best_sd = 0.0
        self.pruned: set[str] = set()

    def is_check(self, fold: int, epoch: int) -> bool:
        return fold < self.folds - 1 and (epoch == self.epochs or (self.interval > 0 and epoch % self.interval == 0))

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        fold, epoch, mean = result.get("fold"), result.get("epoch"), result.get(METRIC)
        if fold is None or epoch is None or mean is None:
            return False
        point = (int(fold), int(epoch))
        curve = self.curves.setdefault(trial_id, {})
        curve[point] = float(mean)
        if result.get("status") == Status.COMPLETED.value:
            self._finished(trial_id, result)
            return False
        if result.get("status") != Status.RUNNING.value or not self.is_check(*point):
            return False
        if self.best is None or point not in self.best:
            return False
        bar = self.best[point] - self.margin - self.best_sd / np.sqrt(point[0] + 1)
        if curve[point] < bar:
            self.pruned.add(trial_id)
            self.curves.pop(trial_id)
            return True
        return False

    def _finished(self, trial_id: str, result: dict[str, Any]) -> None:
        curve = self.curves.pop(trial_id)
        scores = [float(result[f"{FOLD_SCORE}{k}"]) for k in range(self.folds) if f"{FOLD_SCORE}{k}" in result]
        if len(scores) == self.folds and float(result[METRIC]) > self.best_mean:
            self.best, self.best_mean = curve, float(result[METRIC])
            self.best_sd = float(np.std(scores, ddof=1))

    def stop_all(self) -> bool:
        return False
