"""Which test predictions show the chosen config: its confirm runs' (one set per seed) when the confirm stage ran it,
else the chosen trial's own ``test_predictions.csv``.

The chosen config is the ranking rule's best completed trial (:func:`ips_search.experiment.best`); the test set
took no part in choosing it. Each confirm seed keeps its own curve rather than pooling the seeds' probabilities into
one: a pooled curve would hide how much the test figure moves from one seed to the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ips_search.experiment import best
from ips_search.experiment.confirmation import SEED, SOURCE
from ips_search.report.axes import describe
from ips_search.report.load import Experiment
from ips_search.report.sources import PREDICTIONS_FILE, read_confirm_runs, read_predictions


@dataclass(frozen=True)
class ChosenPredictions:
    """The chosen trial, its test predictions by curve label, what they come from, and (when there are none) why."""

    trial_id: str | None
    frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    source: str = ""
    note: str | None = None


def chosen_predictions(exp: Experiment) -> ChosenPredictions:
    """The test predictions of the chosen config (see the module docstring); ``note`` says why there are none."""
    row = best(exp.trials) if not exp.trials.empty else None
    if row is None:
        return ChosenPredictions(None, note="no trial has completed, so no config is chosen yet")
    trial_id = str(row["trial_id"])
    config = describe(row)
    runs = read_confirm_runs(exp.path)
    runs = runs[runs[SOURCE] == trial_id]
    frames: dict[str, pd.DataFrame] = {}
    for run in runs.to_dict("records"):
        df, _ = read_predictions(run["folder"])
        if df is not None:
            frames[_seed_label(run, len(frames))] = df
    if frames:
        n = len(frames)
        what = f"{n} confirm run{'' if n == 1 else 's'} of trial {trial_id} ({config}), one curve per seed"
        return ChosenPredictions(trial_id, frames, what)
    df, why = read_predictions(row.get("path") if pd.notna(row.get("path")) else None)
    if df is None:
        missing = f"; its {len(runs)} confirm run(s) have none either" if len(runs) else ""
        return ChosenPredictions(
            trial_id, note=f"the chosen trial {trial_id} has no test predictions ({why}{missing}): no ROC curve"
        )
    return ChosenPredictions(trial_id, {f"trial {trial_id}": df}, f"trial {trial_id} ({config}), {PREDICTIONS_FILE}")


def _seed_label(run: dict, i: int) -> str:
    seed = pd.to_numeric(pd.Series([run.get(SEED)]), errors="coerce").iloc[0]
    return f"seed {int(seed)}" if pd.notna(seed) else f"run {i + 1}"
