"""``test_predictions.csv`` of a trial or confirm run: one row per test slide and task, ``slide, patient, task, label,
p0, p1, ...`` (class probabilities; with two classes ``p1`` is the positive class; a multi-label task's ``label`` is
its zeros and ones, ``"0101"``, and ``p<k>`` each label's probability)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from ips_search.experiment import PREDICTIONS_FILE, predictions_file

PROBABILITY = re.compile(r"^p(\d+)$")  # p0, p1, ...: one column per class


def probability_columns(df: pd.DataFrame) -> list[str]:
    """The class-probability columns ``p0, p1, ...`` in class order."""
    found = [(int(m.group(1)), c) for c in df.columns if (m := PROBABILITY.match(str(c)))]
    return [c for _, c in sorted(found)]


def read_predictions(folder: str | Path | None) -> tuple[pd.DataFrame | None, str | None]:
    """``(table, None)``, or ``(None, why)`` when ``folder`` has no readable ``test_predictions.csv``, in words."""
    if folder is None:
        return None, "its folder is not in the experiment any more"
    path = predictions_file(folder)  # in the trial's last checkpoint
    if path is None:
        return None, f"it has no {PREDICTIONS_FILE}"
    try:
        # label as text: a multi-label task writes each slide's labels as zeros and ones ("0101")
        df = pd.read_csv(path, dtype={"slide": str, "patient": str, "task": str, "label": str})
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        return None, f"its {PREDICTIONS_FILE} is unreadable ({type(exc).__name__})"
    if "label" not in df or not probability_columns(df):
        return None, f"its {PREDICTIONS_FILE} lacks the label or the class probabilities p0, p1, ..."
    if "task" not in df:
        df["task"] = ""
    df["task"] = df["task"].fillna("").astype(str)
    return df, None
