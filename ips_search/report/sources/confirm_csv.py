"""The confirm stage's files: ``confirm.csv`` (one row per confirmed config) and ``confirm/trials.csv`` (its runs).

``confirm.csv`` holds each confirmed config's test figures over its confirm runs (``confirm_runs``, the test metric's
mean and standard deviation, its patient-level bootstrap 95% interval ``confirm_test_ci_low`` ..
``confirm_test_ci_high``, ``metric``); one an older version wrote has the validation and test accuracy's mean and
standard deviation and no interval. The runs are found by their ``confirm_of`` (the search trial they retrain), from
``confirm/trials.csv`` or, when that is gone, from each run folder's ``params.json``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ips_search.experiment import CONFIRM_CSV, CONFIRM_DIR, PARAMS_FILE, TRIALS_CSV
from ips_search.experiment.confirmation import RUN, SEED, SOURCE
from ips_search.report.sources.json_files import read_json
from ips_search.report.sources.trial_folders import trial_folders

RUN_COLUMNS = ["trial_id", SOURCE, SEED, "status", "folder"]
_UNREADABLE = (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError)


def read_confirm_csv(folder: str | Path) -> tuple[pd.DataFrame | None, str | None]:
    """``(table, None)``; ``(None, None)`` without a confirm stage; ``(None, why)`` when the file can't be read."""
    path = Path(folder) / CONFIRM_CSV
    if not path.is_file():
        return None, None
    try:
        df = pd.read_csv(path, dtype={"trial_id": str})
    except _UNREADABLE as exc:
        return None, f"{CONFIRM_CSV} is unreadable ({type(exc).__name__}): the confirm stage is not shown"
    if "trial_id" not in df:
        return None, f"{CONFIRM_CSV} has no trial_id column: the confirm stage is not shown"
    return df, None


def read_confirm_runs(folder: str | Path) -> pd.DataFrame:
    """One row per confirm run: its ``trial_id``, ``confirm_of``, ``confirm_seed``, ``status`` and ``folder`` (the
    run's folder in this experiment, or ``None``); empty without a confirm stage."""
    stage = Path(folder) / CONFIRM_DIR
    if not stage.is_dir():
        return pd.DataFrame(columns=RUN_COLUMNS)
    try:
        csv = pd.read_csv(stage / TRIALS_CSV, dtype={"trial_id": str, SOURCE: str})
    except _UNREADABLE:
        csv = None
    if csv is not None and SOURCE in csv:
        paths = csv["path"] if "path" in csv else pd.Series(None, index=csv.index)
        rows = csv.assign(folder=[_run_folder(stage, p) for p in paths])
    else:  # the stage's trials.csv is gone: each run folder's params.json says what it retrains
        rows = pd.DataFrame([_from_params(p) for p in trial_folders(stage)])
    rows = rows.reindex(columns=RUN_COLUMNS)
    return rows[rows[SOURCE].notna()].assign(**{SOURCE: lambda d: d[SOURCE].astype(str)}).reset_index(drop=True)


def _run_folder(stage: Path, path: object) -> Path | None:
    """A run's folder: where ``trials.csv`` says, or the folder of that name in ``stage`` (the experiment moved)."""
    if not isinstance(path, str) or not path:
        return None
    for candidate in (Path(path), stage / Path(path).name):
        if candidate.is_dir():
            return candidate
    return None


def _from_params(path: Path) -> dict[str, object]:
    run = read_json(path / PARAMS_FILE).get(RUN)
    run = run if isinstance(run, dict) else {}
    return {"trial_id": path.name, SOURCE: run.get(SOURCE), SEED: run.get(SEED), "folder": path}
