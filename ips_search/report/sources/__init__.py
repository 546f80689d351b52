"""The files an experiment folder holds, one reader per source; each reads only and never raises on damage.

* :mod:`.trials_csv`: ``trials.csv``, the driver's table of trials and Ray's status of each;
* :mod:`.trial_folders`: each trial's ``params.json`` and ``result.json`` (its config, metrics and curve);
* :mod:`.ray_state`: Ray's ``experiment_state-*.json``, a private format, for trials ``trials.csv`` does not list;
* :mod:`.optuna_journal`: the Optuna study, from a private copy of ``optuna.journal``;
* :mod:`.confirm_csv`: the confirm stage's ``confirm.csv`` and its runs (``confirm/``);
* :mod:`.reference`: where the full-bag reference run (``reference/``) lives;
* :mod:`.predictions`: a trial's ``test_predictions.csv`` (class probabilities per test slide).

:mod:`ips_search.report.merge` puts them together. Nothing here unpickles anything or imports Ray.
"""

from ips_search.experiment import sampled
from ips_search.report.sources.confirm_csv import read_confirm_csv, read_confirm_runs
from ips_search.report.sources.json_files import read_json, read_json_lines
from ips_search.report.sources.optuna_journal import load_study, read_study
from ips_search.report.sources.predictions import PREDICTIONS_FILE, probability_columns, read_predictions
from ips_search.report.sources.ray_state import RayTrialState, read_ray_states
from ips_search.report.sources.reference import REFERENCE_DIR, REFERENCE_LABEL, reference_folder
from ips_search.report.sources.trial_folders import (
    CURVE_COLUMNS,
    TrialFolder,
    read_trial_folder,
    trial_folders,
)
from ips_search.report.sources.trials_csv import read_trials_csv

__all__ = [
    "CURVE_COLUMNS",
    "PREDICTIONS_FILE",
    "REFERENCE_DIR",
    "REFERENCE_LABEL",
    "RayTrialState",
    "TrialFolder",
    "load_study",
    "probability_columns",
    "read_confirm_csv",
    "read_confirm_runs",
    "read_json",
    "read_json_lines",
    "read_predictions",
    "read_ray_states",
    "read_study",
    "read_trial_folder",
    "read_trials_csv",
    "reference_folder",
    "sampled",
    "trial_folders",
]
