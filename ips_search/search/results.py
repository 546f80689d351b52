"""``trials.csv``: one row per trial (the record of :mod:`ips_search.experiment.record`), rewritten by the driver
as trials report and finish."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from ips_search.experiment import COLUMN_NAMES, IDENTITY, TRIALS_CSV, trial_record
from ips_search.experiment.confirmation import RUN

BEST_OF = "val_accuracy"
__all__ = ["TRIALS_CSV", "TrialsCsvCallback", "trial_row", "write_trials_csv"]


def trial_row(trial: Any) -> dict[str, Any]:
    """The record of a ``ray.tune.experiment.Trial`` (see :func:`ips_search.experiment.trial_record`)."""
    # the best epoch's validation accuracy over all reports (Ray keeps each metric's max)
    analysis = trial.metric_analysis.get(BEST_OF, {}) if trial.metric_analysis else {}
    return trial_record(
        trial.last_result or {},
        trial_id=trial.trial_id,
        ray_status=trial.status,
        config=trial.config.get(RUN, trial.config),  # a confirm run wraps a search trial's config
        val_accuracy_best=analysis.get("max"),
        path=trial.path,
    )


def trials_table(trials: list[Any]) -> pd.DataFrame:
    """One row per trial (:func:`trial_row`), the columns in the record's order."""
    rows = [trial_row(t) for t in trials]
    return pd.DataFrame(rows, columns=_ordered(rows))


def write_table(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Atomically (re)write ``path`` so a crash never leaves a half-written file."""
    tmp = Path(f"{path}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)


def write_trials_csv(trials: list[Any], path: str | os.PathLike) -> pd.DataFrame:
    """Atomically (re)write ``trials.csv`` from ``trials``."""
    df = trials_table(trials)
    write_table(df, path)
    return df


class TrialsCsvCallback(Callback):
    """Keeps ``trials.csv`` current: after each result of a trial that changed, and at the end."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.warned = False

    def table(self, trials: list) -> pd.DataFrame:
        """What the file holds: a row per trial of this experiment."""
        return trials_table(trials)

    def _write(self, trials: list) -> None:
        try:
            write_table(self.table(trials), self.path)
        except OSError as exc:  # a full disk must not stop the search: Tune re-raises callback errors
            if not self.warned:
                print(
                    f"warning: cannot write {self.path} ({exc.strerror}); it is rewritten when space frees up",
                    file=sys.stderr,
                )
                self.warned = True

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._write(trials)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._write(trials)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._write(trials)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._write(trials)


def _ordered(rows: list[dict[str, Any]]) -> list[str]:
    """Identity columns, then the searched parameters, then the record's columns in their declared order."""
    names = list(dict.fromkeys(k for row in rows for k in row))
    params = [k for k in names if k not in COLUMN_NAMES]
    return [*IDENTITY, *params, *(c for c in COLUMN_NAMES if c not in IDENTITY)]


def trial_dirname(trial: Any) -> str:
    """Short, config-free trial folder names (Ray's default embeds the whole config)."""
    return f"{trial.trainable_name}_{trial.trial_id}"
