"""Read an ips-search experiment from disk: settings, one tidy row per trial, per-epoch curves, the Optuna study,
the confirm stage and the full-bag reference run.

Only what is on disk is read, so this works while a search runs, after it finished and after it crashed:
``experiment.json`` says the folder is ours (:mod:`.discover`); ``trials.csv``, the trial folders and Ray's
snapshot are read by :mod:`.sources` and merged by :mod:`.merge`; ``confirm.csv`` and ``reference/`` (its own
``trials.csv`` and trial folder) likewise; the study is read from a private copy of ``optuna.journal``. Nothing here
unpickles anything (Ray's ``*.pkl`` files are ignored) or imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ips_search.experiment import REPORT_DIR
from ips_search.report.axes import PARAM_ORDER, param_columns
from ips_search.report.discover import latest_experiment, read_experiment_json
from ips_search.report.merge import merge_curves, merge_trials
from ips_search.report.selection import Evaluation, confirmed_from_trials, confirmed_table, evaluation_of
from ips_search.report.sources import (
    CURVE_COLUMNS,
    REFERENCE_DIR,
    TrialFolder,
    load_study,
    read_confirm_csv,
    read_json_lines,
    read_ray_states,
    read_trial_folder,
    read_trials_csv,
    reference_folder,
    trial_folders,
)

__all__ = [
    "CURVE_COLUMNS",
    "PARAM_ORDER",
    "Experiment",
    "latest_experiment",
    "load_curves",
    "load_experiment",
    "load_results",
    "load_study",
    "param_columns",
    "read_experiment_json",
    "read_json_lines",
    "trial_folders",
]


@dataclass
class Experiment:
    """An experiment as read from disk.

    ``trials``: one row per trial (see :func:`load_results`); ``curves``: one row
    per trial and epoch; ``notes``: what was missing or unreadable, in words; ``confirm``: one row per confirmed
    config (``confirm.csv`` with the config's M, I, P, lr), empty without a confirm stage; ``reference``: the
    full-bag reference run's row (M = N), empty without one.
    """

    path: Path
    meta: dict[str, Any]
    trials: pd.DataFrame
    curves: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    confirm: pd.DataFrame = field(default_factory=pd.DataFrame)
    reference: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def name(self) -> str:
        return str(self.settings.get("name") or self.path.name)

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.meta.get("settings") or {})

    @property
    def space(self) -> dict[str, Any]:
        return dict(self.meta.get("space") or {})

    @property
    def max_memory_mb(self) -> float | None:
        value = self.settings.get("max_memory_mb")
        return float(value) if value is not None else None

    @property
    def multi_objective(self) -> bool:
        return self.settings.get("objective") == "accuracy-memory"

    @property
    def max_epochs(self) -> int | None:
        epochs = self.settings.get("epochs") or (self.space.get("train") or {}).get("epochs")
        return int(epochs) if epochs else None

    @property
    def params(self) -> list[str]:
        """The searched parameters present in ``trials`` (M, I, P, lr first)."""
        return param_columns(self.trials, self.space)

    @property
    def evaluation(self) -> Evaluation:
        """The metric configs were ranked by and over how many patient-level folds (legacy: validation accuracy)."""
        return evaluation_of(self.trials, {**self.space, **self.settings})

    @property
    def report_dir(self) -> Path:
        return self.path / REPORT_DIR


def load_experiment(path: str | Path) -> Experiment:
    """Read an experiment folder; :class:`ConfigError` if it is not an ips-search experiment."""
    folder = Path(path).expanduser().resolve()
    meta = read_experiment_json(folder)
    space = meta.get("space") or {}
    trials, readable, notes = _read_trials(folder, space, ray_states=True)
    confirm, why = read_confirm_csv(folder)
    notes += [why] if why else []
    confirm = confirmed_table(confirm if confirm is not None else confirmed_from_trials(trials), trials)
    reference = pd.DataFrame()
    if (ref := reference_folder(folder)) is not None:
        reference, _, ref_notes = _read_trials(ref, space, ray_states=False)
        notes += [f"{REFERENCE_DIR}/: {n}" for n in ref_notes]
    return Experiment(
        path=folder,
        meta=meta,
        trials=trials,
        curves=merge_curves(readable),
        notes=notes,
        confirm=confirm,
        reference=reference,
    )


def _read_trials(
    folder: Path, space: dict[str, Any], ray_states: bool
) -> tuple[pd.DataFrame, list[TrialFolder], list[str]]:
    """The trials of one Tune experiment folder (the search's, or the reference run's), its readable trial folders
    and notes; Ray's snapshot (a private format) only when asked and only when ``trials.csv`` is gone."""
    notes: list[str] = []
    csv, why = read_trials_csv(folder)
    if why:
        notes.append(why)
    states = read_ray_states(folder) if ray_states and csv is None else {}
    folders = [read_trial_folder(p) for p in trial_folders(folder)]
    readable = [f for f in folders if f.readable]
    if len(readable) < len(folders):
        notes.append(f"{len(folders) - len(readable)} trial folder(s) had no readable result.json or params.json")
    trials, merge_notes = merge_trials(csv, readable, states, space)
    return trials, readable, notes + merge_notes


def load_results(path: str | Path) -> pd.DataFrame:
    """One tidy row per trial of the experiment in ``path``.

    Columns: ``trial_id, status, ray_status``, the searched parameters (``memory_size,
    iteration_size, patch_size, lr``, ...), ``val_accuracy`` (last epoch),
    ``val_accuracy_best`` (its best epoch), ``test_accuracy`` (after the last epoch), ``peak_memory_mb``,
    ``memory_kind``, ``feasible``, ``epochs``, ``time_total_s``, ``train_seconds``,
    ``images_per_s``, ``n_patches``, ``path`` (the trial's folder). ``status`` is one of
    completed, early-stopped, infeasible, nan-loss, out-of-memory, failed, running, pending (and pruned, with folds).

    A cross-validated search adds ``metric``, ``folds``, ``folds_done``, ``val_score_mean``, ``val_score_std``,
    ``val_score_fold0`` .. ``val_score_fold{K-1}``, ``test_score`` and each metric's ``val_*`` and ``test_*``; an
    experiment from before has ``val_score_mean`` filled from ``val_accuracy`` (its score).
    """
    return load_experiment(path).trials


def load_curves(path: str | Path) -> pd.DataFrame:
    """One row per trial and epoch: ``trial_id, epoch, val_accuracy, val_loss, train_loss, ...``."""
    return load_experiment(path).curves
