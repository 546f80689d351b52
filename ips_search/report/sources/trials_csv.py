"""``trials.csv``: the driver's table of trials, rewritten as the search goes (it may be stale, missing or torn).

An older version's column names are read under today's (:func:`ips_search.experiment.renamed`) before the rows meet
the trial folders' in :mod:`ips_search.report.merge`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ips_search.experiment import TRIALS_CSV, renamed


def read_trials_csv(folder: str | Path) -> tuple[pd.DataFrame | None, str | None]:
    """``(table, None)``, or ``(None, why)`` when ``trials.csv`` is missing or unreadable, in words."""
    path = Path(folder) / TRIALS_CSV
    if not path.is_file():
        return None, f"{TRIALS_CSV} is missing: trials were rebuilt from their folders"
    try:
        df = pd.read_csv(path, dtype={"trial_id": str})
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return None, f"{TRIALS_CSV} is unreadable ({type(exc).__name__}): trials were rebuilt from their folders"
    if "trial_id" not in df:
        return None, f"{TRIALS_CSV} has no trial_id column: trials were rebuilt from their folders"
    return renamed(df), None
