"""The confirm stage's arithmetic: each confirmed config's runs (the search's own and its extra seeds), their mean
and standard deviation, written beside the search's trials. Ray-free: the stage itself is
:mod:`ips_search.search.confirm`.
"""

from __future__ import annotations

import pandas as pd

from ips_search.experiment.record import CONFIRM_COLUMNS, METRIC
from ips_search.experiment.status import Status

RUN = "run"  # the confirm trainable's one config key: a whole search-trial config
SOURCE = "confirm_of"  # a confirm run's config key: the trial id of the config it retrains
SEED = "confirm_seed"


def summarize(trials: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per confirmed config: ``trial_id`` (the search's trial) and the confirm columns (the interval
    columns are the caller's: they need the runs' predictions).

    ``runs`` are the confirm stage's trials (``confirm/trials.csv``) with ``confirm_of``; only completed runs count.
    Runs retrained on every non-test item have no validation: their test scores give the mean and the sample
    standard deviation (``ddof=1``). Runs of an older confirm stage, which validated, are summarised as they were
    then: the search's own run counts as one of them, and their validation mean ranks the confirmed configs.
    """
    rows = []
    done = runs[runs["status"].astype(str) == Status.COMPLETED] if not runs.empty else runs
    for source in runs[SOURCE].dropna().astype(str).unique() if SOURCE in runs else []:
        mine = done[done[SOURCE].astype(str) == source]
        # the validation score: today's name, or the accuracy an older stage's runs reported
        val_column = next((c for c in (METRIC, "val_accuracy") if c in mine and mine[c].notna().any()), None)
        if val_column is not None:
            own = trials[trials["trial_id"].astype(str) == source]
            mine = pd.concat([own[own["status"].astype(str) == Status.COMPLETED], mine])
        val = pd.to_numeric(mine[val_column], errors="coerce").dropna() if val_column else pd.Series(dtype=float)
        score = "test_score" if "test_score" in mine and mine["test_score"].notna().any() else "test_accuracy"
        test = pd.to_numeric(mine.get(score, pd.Series(dtype=float)), errors="coerce").dropna()
        rows.append(
            {
                "trial_id": source,
                "confirm_runs": len(mine),
                "confirm_val_mean": val.mean() if len(val) else None,
                "confirm_val_std": val.std(ddof=1) if len(val) > 1 else 0.0 if len(val) else None,
                "confirm_test_mean": test.mean() if len(test) else None,
                "confirm_test_std": test.std(ddof=1) if len(test) > 1 else 0.0 if len(test) else None,
            }
        )
    return pd.DataFrame(rows, columns=["trial_id", *CONFIRM_COLUMNS])


def attach(trials: pd.DataFrame, summary: pd.DataFrame) -> pd.DataFrame:
    """``trials`` with the confirm columns filled from ``summary`` (replacing any earlier ones)."""
    out = trials.drop(columns=[c for c in CONFIRM_COLUMNS if c in trials])
    if summary.empty:
        return out
    keyed = summary.assign(trial_id=summary["trial_id"].astype(str))
    return out.assign(trial_id=out["trial_id"].astype(str)).merge(keyed, on="trial_id", how="left")
