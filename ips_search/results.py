"""``trials.csv``: one tidy row per trial, rewritten by the driver as trials report and finish.

Status of a trial: ``completed`` (all epochs), ``early-stopped`` (stopped by the
scheduler before its last epoch), ``infeasible`` (over the memory budget),
``nan-loss``, ``out-of-memory``, ``failed`` (raised), ``running`` or ``pending``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from ips_search.layout import TRIALS_CSV, trial_status
from ips_search.space import QUANTILE_SUFFIX

__all__ = ["TRIALS_CSV", "TrialsCsvCallback", "trial_row", "write_trials_csv"]


def trial_row(trial: Any) -> dict[str, Any]:
    """One row for a ``ray.tune.experiment.Trial``."""
    last = trial.last_result or {}
    params = {k: v for k, v in trial.config.items() if k not in ("fixed", "max_memory_mb")}
    params.update({k: last[k] for k in ("memory_size", "iteration_size", "patch_size") if k in last})
    best = trial.metric_analysis.get("val_accuracy", {}).get("max") if trial.metric_analysis else None
    row = {"trial_id": trial.trial_id, "status": trial_status(trial.status, last), "ray_status": trial.status}
    row.update({k: v for k, v in params.items() if not k.endswith(QUANTILE_SUFFIX)})
    row.update(
        {
            "val_accuracy": last.get("val_accuracy"),
            "best_val_accuracy": best,
            "test_accuracy": last.get("test_accuracy"),
            "peak_memory_mb": last.get("peak_memory_mb"),
            "memory_kind": last.get("memory_kind"),
            "feasible": last.get("feasible"),
            "epochs": last.get("training_iteration"),
            "time_total_s": last.get("time_total_s"),
            "train_seconds": last.get("train_seconds"),
            "images_per_s": last.get("images_per_s"),
            "n_patches": last.get("n_patches"),
            "node_ip": last.get("node_ip"),
            "path": trial.path,
        }
    )
    return row


def write_trials_csv(trials: list[Any], path: str | os.PathLike) -> pd.DataFrame:
    """Atomically (re)write ``trials.csv`` so a crash never leaves a half-written file."""
    df = pd.DataFrame([trial_row(t) for t in trials])
    tmp = Path(f"{path}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, path)
    return df


class TrialsCsvCallback(Callback):
    """Keeps ``trials.csv`` current: after each result of a trial that changed, and at the end."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = path
        self.warned = False

    def _write(self, trials: list) -> None:
        try:
            write_trials_csv(trials, self.path)
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
